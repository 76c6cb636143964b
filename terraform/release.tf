# Releases in order. Every apply that changes the image (and the first apply) runs the setup
# task of the new image — migrations as the master user, the application and registry roles,
# topics, schemas, `weir doctor` — waits for it to stop and checks every container's exit
# status, and only then lets the services move: their task definition ARNs come out of
# terraform_data.release, which exists only once its setup run has succeeded. A failed setup
# leaves the release tainted, the services on their old revision, and the next apply retries it.
#
# The run itself is terraform/scripts/run-task (AWS CLI v2 on the machine running terraform).

resource "aws_ecs_task_definition" "setup" {
  family                   = "${local.prefix}-setup"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 512
  memory                   = 1024
  execution_role_arn       = aws_iam_role.execution_setup.arn
  task_role_arn            = aws_iam_role.task.arn
  skip_destroy             = true

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  container_definitions = jsonencode([{
    name                   = "setup"
    image                  = local.weir_image
    entryPoint             = ["/usr/local/lib/weir/setup"]
    command                = []
    essential              = true
    readonlyRootFilesystem = true
    user                   = "10001"
    environment = [for k, v in merge(local.weir_environment, {
      WEIR_SETUP_DB_HOST            = aws_db_instance.weir.address
      WEIR_SETUP_DB_NAME            = "weir"
      WEIR_SETUP_APP_ROLE           = local.db_app_user
      WEIR_SETUP_REGISTRY_ROLE      = local.run_registry ? local.db_registry_user : ""
      WEIR_SETUP_REGISTRY_WAIT_SECS = "900"
    }) : { name = k, value = v }]
    secrets = concat(local.weir_secrets, [
      { name = "WEIR_SETUP_MASTER_USER", valueFrom = "${aws_db_instance.weir.master_user_secret[0].secret_arn}:username::" },
      { name = "WEIR_SETUP_MASTER_PASSWORD", valueFrom = "${aws_db_instance.weir.master_user_secret[0].secret_arn}:password::" },
      { name = "WEIR_SETUP_APP_PASSWORD", valueFrom = aws_secretsmanager_secret.db_app_password.arn },
      ], local.run_registry ? [
      { name = "WEIR_SETUP_REGISTRY_PASSWORD", valueFrom = aws_secretsmanager_secret.db_registry_password.arn },
    ] : [])
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.weir.name
        awslogs-region        = var.region
        awslogs-stream-prefix = "setup"
      }
    }
  }])
}

locals {
  # How the machine running terraform starts one-off tasks (tests replace it with a fake).
  task_runner = var.task_runner != "" ? var.task_runner : "${path.module}/scripts/run-task"
  task_network = {
    WEIR_SUBNETS         = join(",", var.private_subnet_ids)
    WEIR_SECURITY_GROUPS = aws_security_group.tasks.id
  }
}

resource "terraform_data" "release" {
  # A new setup revision (new image, new settings) is a new release: replaced, so its
  # provisioner runs the setup again.
  triggers_replace = [aws_ecs_task_definition.setup.arn, local.weir_image]

  # What the services run once this release's setup has succeeded, as family:revision.
  input = { for k, td in aws_ecs_task_definition.processor : k => "${td.family}:${td.revision}" }

  provisioner "local-exec" {
    command = local.task_runner
    environment = merge(local.task_network, {
      AWS_REGION           = var.region
      WEIR_CLUSTER         = aws_ecs_cluster.weir.name
      WEIR_TASK_DEFINITION = aws_ecs_task_definition.setup.arn
      WEIR_WHAT            = "setup of ${local.weir_image}"
      WEIR_TIMEOUT_SECS    = "1800"
    })
  }

  # Everything the setup task talks to must exist before it runs.
  depends_on = [
    aws_msk_scram_secret_association.weir,
    aws_secretsmanager_secret_version.database_url,
    aws_secretsmanager_secret_version.db_app_password,
    aws_secretsmanager_secret_version.db_registry_password,
    aws_secretsmanager_secret_version.kafka,
    aws_ecs_service.registry,
    aws_iam_role_policy.execution_setup,
    aws_iam_role_policy.task,
    aws_vpc_endpoint.interface,
    aws_vpc_endpoint.s3,
    aws_vpc_security_group_egress_rule.tasks,
    aws_vpc_security_group_ingress_rule.db_tasks,
    aws_vpc_security_group_ingress_rule.msk_scram,
  ]
}

# API keys (docs/deploy-aws.md, "API keys"): `weir keys create` writes the key into a file on
# the task's own volume, never to its output; a second container stores the file in Secrets
# Manager as <name>/api-keys/<secret name>. The key is in no log and in no terminal.
resource "aws_ecs_task_definition" "api_key" {
  family                   = "${local.prefix}-api-key"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 256
  memory                   = 512
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.api_key.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  volume {
    name = "key"
  }

  container_definitions = jsonencode([
    {
      # The task volume is root's: hand it to weir's user before weir writes.
      name                   = "prepare"
      image                  = local.aws_cli_image
      entryPoint             = ["/bin/sh", "-c"]
      command                = ["chown 10001 /key && chmod 0700 /key"]
      essential              = false
      readonlyRootFilesystem = true
      mountPoints            = [{ sourceVolume = "key", containerPath = "/key" }]
      logConfiguration       = local.api_key_logs
    },
    {
      name                   = "create"
      image                  = local.weir_image
      entryPoint             = ["/bin/sh", "-c"]
      command                = ["umask 077 && weir keys create --workspace \"$WEIR_KEY_WORKSPACE\" --permission \"$WEIR_KEY_PERMISSION\" > /key/key"]
      essential              = false
      readonlyRootFilesystem = true
      user                   = "10001"
      dependsOn              = [{ containerName = "prepare", condition = "SUCCESS" }]
      mountPoints            = [{ sourceVolume = "key", containerPath = "/key" }]
      environment            = [for k, v in local.weir_environment : { name = k, value = v }]
      secrets                = local.weir_secrets
      logConfiguration       = local.api_key_logs
    },
    {
      name                   = "store"
      image                  = local.aws_cli_image
      entryPoint             = ["/bin/sh", "-c"]
      command                = ["aws secretsmanager create-secret --name \"${local.prefix}/api-keys/$WEIR_KEY_SECRET_NAME\" --kms-key-id ${aws_kms_key.weir.arn} --secret-string file:///key/key --query ARN --output text; s=$?; rm -f /key/key; exit $s"]
      essential              = true
      readonlyRootFilesystem = true
      dependsOn              = [{ containerName = "create", condition = "SUCCESS" }]
      mountPoints            = [{ sourceVolume = "key", containerPath = "/key" }]
      environment            = [{ name = "AWS_REGION", value = var.region }]
      logConfiguration       = local.api_key_logs
    },
  ])
}

locals {
  api_key_logs = {
    logDriver = "awslogs"
    options = {
      awslogs-group         = aws_cloudwatch_log_group.weir.name
      awslogs-region        = var.region
      awslogs-stream-prefix = "api-key"
    }
  }
}
