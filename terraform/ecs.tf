# The weir processes on ECS Fargate: one service per processor (`weir run <name>`), all from one
# image; a one-off setup task (migrations, topics, schemas, doctor) run before the services.

resource "aws_ecs_cluster" "weir" {
  name = local.prefix

  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

resource "aws_cloudwatch_log_group" "weir" {
  name              = "/${local.prefix}/weir"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.weir.arn
}

resource "aws_service_discovery_private_dns_namespace" "weir" {
  name = "${local.prefix}.internal"
  vpc  = var.vpc_id
}

locals {
  # Settings shared by every weir container (docs/configuration.md). Secrets come separately.
  weir_environment = merge({
    KAFKA_BOOTSTRAP_SERVERS                   = aws_msk_cluster.weir.bootstrap_brokers_sasl_scram
    WEIR__KAFKA__PARTITIONS                   = tostring(var.kafka_partitions)
    WEIR__KAFKA__REPLICATION_FACTOR           = "3"
    WEIR__KAFKA__DLQ_RETENTION_MS             = tostring(var.dlq_retention_days * 86400000)
    WEIR__KAFKA__CONSUMER__SECURITY__PROTOCOL = "SASL_SSL"
    WEIR__KAFKA__CONSUMER__SASL__MECHANISM    = "SCRAM-SHA-512"
    WEIR__KAFKA__CONSUMER__SASL__USERNAME     = "weir"
    WEIR__KAFKA__PRODUCER__SECURITY__PROTOCOL = "SASL_SSL"
    WEIR__KAFKA__PRODUCER__SASL__MECHANISM    = "SCRAM-SHA-512"
    WEIR__KAFKA__PRODUCER__SASL__USERNAME     = "weir"
    WEIR__POSTGRES__MAX_CONNECTIONS           = tostring(var.db_max_connections)
    SCHEMA_REGISTRY_URL                       = local.registry_url
    WEIR__CAS__BACKEND                        = "s3"
    S3_BUCKET                                 = aws_s3_bucket.cas.id
    AWS_REGION                                = var.region
    # AWS itself: no endpoint, no static keys (the task role), local-stack credentials refused.
    WEIR__S3__PROFILE                 = "aws"
    WEIR__CAS__SERVER_SIDE_ENCRYPTION = "aws:kms"
    WEIR__CAS__KMS_KEY_ID             = aws_kms_key.weir.arn
    WEIR__TELEMETRY__LOG_FORMAT       = "json"
    WEIR__TELEMETRY__LISTEN           = "0.0.0.0:${local.metrics_port}"
  }, var.extra_environment)

  # The Kafka password is the "password" key of the MSK SCRAM secret (a JSON document).
  weir_secrets = [
    { name = "DATABASE_URL", valueFrom = aws_secretsmanager_secret.database_url.arn },
    { name = "WEIR__KAFKA__CONSUMER__SASL__PASSWORD", valueFrom = "${aws_secretsmanager_secret.kafka.arn}:password::" },
    { name = "WEIR__KAFKA__PRODUCER__SASL__PASSWORD", valueFrom = "${aws_secretsmanager_secret.kafka.arn}:password::" },
  ]

  processor_environment = {
    gateway = {
      WEIR__GATEWAY__LISTEN = "0.0.0.0:${local.gateway_port}"
      # Behind the ALB: per-client limits key on the address the ALB saw (the last
      # X-Forwarded-For entry), not on the ALB's own addresses.
      WEIR__GATEWAY__CLIENT_IP_FROM_FORWARDED_FOR = "true"
    }
  }
  # The cache processor and the gateway (semantic lookups) both embed prompts.
  embedder_secrets = var.embedder_api_key_secret_arn == "" ? [] : [
    { name = "WEIR__CACHE__OPENAI_API_KEY", valueFrom = var.embedder_api_key_secret_arn },
  ]
  processor_secrets = {
    cache   = local.embedder_secrets
    gateway = local.embedder_secrets
  }

  # Variables weir must never see in AWS: they point the blob store at the local stack or
  # give it static keys instead of the task role (checked by terraform/tests).
  forbidden_environment = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WEIR__S3__ACCESS_KEY_ID", "WEIR__S3__SECRET_ACCESS_KEY", "WEIR__S3__ENDPOINT_URL"]
}

resource "aws_ecs_task_definition" "processor" {
  for_each = var.processors
  # Old revisions stay registered: a rollback points the service back at one.
  skip_destroy             = true
  family                   = "${local.prefix}-${each.key}"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = each.value.cpu
  memory                   = each.value.memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  container_definitions = jsonencode([{
    name      = each.key
    image     = local.weir_image
    command   = ["run", each.key]
    essential = true
    # weir needs no file system of its own: everything is in Kafka, Postgres and S3.
    readonlyRootFilesystem = true
    user                   = "10001"
    # weir stops on SIGTERM within runtime.shutdown_deadline_ms (final commit, then leave the group).
    stopTimeout = 60
    environment = [for k, v in merge(local.weir_environment, lookup(local.processor_environment, each.key, {})) : { name = k, value = v }]
    secrets     = concat(local.weir_secrets, lookup(local.processor_secrets, each.key, []))
    portMappings = concat(
      [{ containerPort = local.metrics_port, protocol = "tcp", name = "metrics" }],
      each.key == "gateway" ? [{ containerPort = local.gateway_port, protocol = "tcp", name = "http" }] : [],
    )
    healthCheck = {
      command     = ["CMD-SHELL", "curl -fsS http://127.0.0.1:${local.metrics_port}/healthz || exit 1"]
      interval    = 15
      timeout     = 5
      retries     = 3
      startPeriod = 30
    }
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.weir.name
        awslogs-region        = var.region
        awslogs-stream-prefix = each.key
      }
    }
  }])
}

resource "aws_ecs_service" "processor" {
  for_each = var.processors
  name     = each.key
  cluster  = aws_ecs_cluster.weir.id
  # From the release (release.tf), not from the task definition directly: a service can only
  # move to a new revision after the setup task of that release has succeeded.
  task_definition        = terraform_data.release.output[each.key]
  desired_count          = each.value.desired_count
  launch_type            = "FARGATE"
  enable_execute_command = false
  propagate_tags         = "SERVICE"

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = false
  }

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  dynamic "load_balancer" {
    for_each = each.key == "gateway" ? [1] : []
    content {
      target_group_arn = aws_lb_target_group.gateway.arn
      container_name   = "gateway"
      container_port   = local.gateway_port
    }
  }

  # ECS refuses a target group that no listener uses yet.
  depends_on = [aws_lb_listener_rule.gateway_api]

  lifecycle {
    ignore_changes = [desired_count] # owned by autoscaling after the first apply
  }
}

