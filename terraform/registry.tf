# The schema registry, when no existing one is given: Apicurio Registry with its
# Confluent-compatible API (/apis/ccompat/v7), stored in its own database `registry` on the
# weir instance, as its own role weir_registry (created by the setup task, infra/aws/setup).
# Reached as registry.<name>.internal. Until the setup task has created its role on a first
# deploy the registry's tasks fail and ECS restarts them; the setup task waits for it.

resource "aws_service_discovery_service" "registry" {
  count = local.run_registry ? 1 : 0
  name  = "registry"

  dns_config {
    namespace_id   = aws_service_discovery_private_dns_namespace.weir.id
    routing_policy = "MULTIVALUE"
    dns_records {
      type = "A"
      ttl  = 10
    }
  }
}

resource "aws_ecs_task_definition" "registry" {
  count                    = local.run_registry ? 1 : 0
  family                   = "${local.prefix}-registry"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 1024
  memory                   = 2048
  execution_role_arn       = aws_iam_role.execution_registry[0].arn

  # checkov:skip=CKV_AWS_336: Apicurio (Quarkus) writes temporary files under its root file system
  container_definitions = jsonencode([{
    name         = "registry"
    image        = local.apicurio_image
    essential    = true
    portMappings = [{ containerPort = 8080, protocol = "tcp" }]
    environment = [
      { name = "APICURIO_STORAGE_KIND", value = "sql" },
      { name = "APICURIO_STORAGE_SQL_KIND", value = "postgresql" },
      { name = "APICURIO_DATASOURCE_URL", value = "jdbc:postgresql://${aws_db_instance.weir.address}:5432/registry?sslmode=require" },
      { name = "APICURIO_DATASOURCE_USERNAME", value = local.db_registry_user },
      # Confluent clients expect the global id in the wire format.
      { name = "APICURIO_CCOMPAT_LEGACY_ID_MODE_ENABLED", value = "true" },
    ]
    secrets = [
      { name = "APICURIO_DATASOURCE_PASSWORD", valueFrom = aws_secretsmanager_secret.db_registry_password.arn },
    ]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.weir.name
        awslogs-region        = var.region
        awslogs-stream-prefix = "registry"
      }
    }
  }])
}

resource "aws_ecs_service" "registry" {
  count           = local.run_registry ? 1 : 0
  name            = "registry"
  cluster         = aws_ecs_cluster.weir.id
  task_definition = aws_ecs_task_definition.registry[0].arn
  desired_count   = 2
  launch_type     = "FARGATE"

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = false
  }

  service_registries {
    registry_arn = aws_service_discovery_service.registry[0].arn
  }
}

# The registry role's password (the setup task sets it on weir_registry).
resource "aws_secretsmanager_secret" "db_registry_password" {
  # checkov:skip=CKV2_AWS_57: rotated by the documented procedure (docs/deploy-aws.md, "Secret rotation")
  name       = "${local.prefix}/database-registry-password"
  kms_key_id = aws_kms_key.weir.arn
}

resource "aws_secretsmanager_secret_version" "db_registry_password" {
  secret_id     = aws_secretsmanager_secret.db_registry_password.id
  secret_string = data.aws_secretsmanager_random_password.db_registry.random_password

  lifecycle {
    ignore_changes = [secret_string]
  }
}
