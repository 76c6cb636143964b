# PostgreSQL 16 with pgvector (RDS ships the extension; `weir migrate` runs CREATE EXTENSION).
# weir keeps positions, heads, runs, timers, cache entries and the outbox here.
#
# Roles: the master user (weir_admin, password managed and rotated by RDS in Secrets Manager)
# is used only by the setup task, which migrates and then creates two login roles with the
# passwords below: weir_app (the processes: read and write rows, no DDL except the semantic
# cache's index) and weir_registry (Apicurio, owner of its own database `registry`).
# infra/aws/setup holds the SQL.

resource "aws_db_subnet_group" "weir" {
  name       = local.prefix
  subnet_ids = var.private_subnet_ids
}

resource "aws_db_parameter_group" "weir" {
  name   = "${local.prefix}-pg16"
  family = "postgres16"

  # The outbox and the position rows are updated at high rates: vacuum them early.
  parameter {
    name  = "autovacuum_vacuum_scale_factor"
    value = "0.02"
  }
  parameter {
    name  = "autovacuum_analyze_scale_factor"
    value = "0.02"
  }
  parameter {
    name  = "autovacuum_naptime"
    value = "10"
  }
  # Batches write thousands of rows per commit; larger WAL segments between checkpoints.
  parameter {
    name         = "max_wal_size"
    value        = "8192"
    apply_method = "pending-reboot"
  }
  parameter {
    name  = "log_min_duration_statement"
    value = "500"
  }
  parameter {
    name  = "rds.force_ssl"
    value = "1"
  }
  # Every weir task's pool (postgres.max_connections) times the tasks at their maximum, plus
  # the registry and the setup task, must fit (a precondition on aws_db_instance.weir checks).
  parameter {
    name         = "max_connections"
    value        = tostring(var.db_max_server_connections)
    apply_method = "pending-reboot"
  }
  parameter {
    name  = "log_connections"
    value = "1"
  }
  parameter {
    name  = "log_disconnections"
    value = "1"
  }
  parameter {
    name  = "log_lock_waits"
    value = "1"
  }
  # HNSW builds and iterative scans of the semantic cache.
  parameter {
    name  = "maintenance_work_mem"
    value = "1048576"
  }
}

# The application role's and the registry role's passwords (generated once; rotation:
# docs/deploy-aws.md). Letters and digits only, so they go into URLs as they are.
data "aws_secretsmanager_random_password" "db" {
  password_length     = 40
  exclude_punctuation = true
}

data "aws_secretsmanager_random_password" "db_registry" {
  password_length     = 40
  exclude_punctuation = true
}

locals {
  # Connections at full scale: each task's pool times the tasks at their maximum, the
  # registry's two tasks (Apicurio's default pool of 20 each) and the setup task.
  db_connections_needed = sum([for p in values(var.processors) : p.max_count * var.db_max_connections]) + (local.run_registry ? 40 : 0) + 5
}

resource "aws_db_instance" "weir" {
  # checkov:skip=CKV_AWS_161: weir's Postgres client authenticates with a password (sqlx has no IAM token support); passwords live in Secrets Manager, the master one rotated by RDS
  # checkov:skip=CKV_AWS_226: minor upgrades are pinned on purpose: the minor decides which pgvector RDS offers (db_engine_version); upgrade by changing it (docs/deploy-aws.md)
  identifier                            = local.prefix
  engine                                = "postgres"
  engine_version                        = var.db_engine_version
  instance_class                        = var.db_instance_class
  allocated_storage                     = var.db_allocated_gib
  max_allocated_storage                 = var.db_allocated_gib * 4
  storage_type                          = "gp3"
  storage_encrypted                     = true
  kms_key_id                            = aws_kms_key.weir.arn
  db_name                               = "weir"
  username                              = local.db_master_user
  manage_master_user_password           = true
  master_user_secret_kms_key_id         = aws_kms_key.weir.arn
  db_subnet_group_name                  = aws_db_subnet_group.weir.name
  vpc_security_group_ids                = [aws_security_group.db.id]
  parameter_group_name                  = aws_db_parameter_group.weir.name
  multi_az                              = var.db_multi_az
  backup_retention_period               = var.db_backup_retention_days
  deletion_protection                   = true
  skip_final_snapshot                   = false
  final_snapshot_identifier             = "${local.prefix}-final"
  performance_insights_enabled          = true
  performance_insights_kms_key_id       = aws_kms_key.weir.arn
  monitoring_interval                   = 30
  monitoring_role_arn                   = aws_iam_role.rds_monitoring.arn
  enabled_cloudwatch_logs_exports       = ["postgresql", "upgrade"]
  auto_minor_version_upgrade            = false
  copy_tags_to_snapshot                 = true
  allow_major_version_upgrade           = false
  apply_immediately                     = false
  iam_database_authentication_enabled   = false
  performance_insights_retention_period = 7

  # RDS would create the export log groups itself, unencrypted and kept forever.
  depends_on = [aws_cloudwatch_log_group.rds]

  lifecycle {
    precondition {
      condition     = local.db_connections_needed <= var.db_max_server_connections - 10
      error_message = "the processors at max_count need more Postgres connections (max_count x db_max_connections, plus the registry and setup) than db_max_server_connections leaves (10 are kept for superuser and rdsadmin)."
    }
  }
}

# RDS writes the instance's logs to these groups (enabled_cloudwatch_logs_exports); created
# here so they are encrypted and expire.
resource "aws_cloudwatch_log_group" "rds" {
  for_each          = toset(["postgresql", "upgrade"])
  name              = "/aws/rds/instance/${local.prefix}/${each.key}"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.weir.arn
}

resource "aws_db_instance" "replica" {
  # checkov:skip=CKV_AWS_161: as the primary: password authentication
  # checkov:skip=CKV_AWS_226: as the primary: the minor is pinned
  # checkov:skip=CKV_AWS_157: a read replica for reads and restore drills; the primary is the Multi-AZ one
  count                               = var.db_read_replica_count
  identifier                          = "${local.prefix}-replica-${count.index}"
  replicate_source_db                 = aws_db_instance.weir.identifier
  instance_class                      = var.db_instance_class
  storage_encrypted                   = true
  kms_key_id                          = aws_kms_key.weir.arn
  vpc_security_group_ids              = [aws_security_group.db.id]
  parameter_group_name                = aws_db_parameter_group.weir.name
  performance_insights_enabled        = true
  performance_insights_kms_key_id     = aws_kms_key.weir.arn
  monitoring_interval                 = 30
  monitoring_role_arn                 = aws_iam_role.rds_monitoring.arn
  enabled_cloudwatch_logs_exports     = ["postgresql", "upgrade"]
  auto_minor_version_upgrade          = false
  copy_tags_to_snapshot               = true
  skip_final_snapshot                 = true
  deletion_protection                 = true
  iam_database_authentication_enabled = false
}

# The application's connection URL, read by the tasks as DATABASE_URL (role weir_app).
resource "aws_secretsmanager_secret" "database_url" {
  # checkov:skip=CKV2_AWS_57: rotated by the documented procedure (docs/deploy-aws.md, "Secret rotation"): the setup task sets the role's password, so a Lambda rotator would race it
  name       = "${local.prefix}/database-url"
  kms_key_id = aws_kms_key.weir.arn
}

resource "aws_secretsmanager_secret_version" "database_url" {
  secret_id     = aws_secretsmanager_secret.database_url.id
  secret_string = "postgres://${local.db_app_user}:${data.aws_secretsmanager_random_password.db.random_password}@${aws_db_instance.weir.address}:5432/weir?sslmode=require"

  # The generator gives a new value on every read; the first one is kept.
  lifecycle {
    ignore_changes = [secret_string]
  }
}

# The same password alone: the setup task sets it on the weir_app role.
resource "aws_secretsmanager_secret" "db_app_password" {
  # checkov:skip=CKV2_AWS_57: rotated with database-url by the documented procedure
  name       = "${local.prefix}/database-app-password"
  kms_key_id = aws_kms_key.weir.arn
}

resource "aws_secretsmanager_secret_version" "db_app_password" {
  secret_id     = aws_secretsmanager_secret.db_app_password.id
  secret_string = data.aws_secretsmanager_random_password.db.random_password

  lifecycle {
    ignore_changes = [secret_string]
  }
}
