# The schema registry, when no existing one is given: Apicurio Registry with its
# Confluent-compatible API (/apis/ccompat/v7), stored in the weir database (its tables do not
# share names with weir's, which start with weir_ or cache_). Reached as registry.<name>.internal.

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
  execution_role_arn       = aws_iam_role.execution.arn

  container_definitions = jsonencode([{
    name         = "registry"
    image        = var.apicurio_image
    essential    = true
    portMappings = [{ containerPort = 8080, protocol = "tcp" }]
    environment = [
      { name = "APICURIO_STORAGE_KIND", value = "sql" },
      { name = "APICURIO_STORAGE_SQL_KIND", value = "postgresql" },
      { name = "APICURIO_DATASOURCE_URL", value = "jdbc:postgresql://${aws_db_instance.weir.address}:5432/weir?sslmode=require" },
      { name = "APICURIO_DATASOURCE_USERNAME", value = "weir" },
      # Confluent clients expect the global id in the wire format.
      { name = "APICURIO_CCOMPAT_LEGACY_ID_MODE_ENABLED", value = "true" },
    ]
    secrets = [
      { name = "APICURIO_DATASOURCE_PASSWORD", valueFrom = aws_secretsmanager_secret.db_password.arn },
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

# The registry's JDBC password (the weir database user's), as its own secret.
resource "aws_secretsmanager_secret" "db_password" {
  name       = "${local.prefix}/database-password"
  kms_key_id = aws_kms_key.weir.arn
}

resource "aws_secretsmanager_secret_version" "db_password" {
  secret_id     = aws_secretsmanager_secret.db_password.id
  secret_string = data.aws_secretsmanager_random_password.db.random_password

  lifecycle {
    ignore_changes = [secret_string]
  }
}
