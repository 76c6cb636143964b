# PostgreSQL 16 with pgvector (RDS ships the extension; `weir migrate` runs CREATE EXTENSION).
# weir keeps positions, heads, runs, timers, cache entries and the outbox here.

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
  # HNSW builds and iterative scans of the semantic cache.
  parameter {
    name  = "maintenance_work_mem"
    value = "1048576"
  }
}

data "aws_secretsmanager_random_password" "db" {
  password_length     = 40
  exclude_punctuation = true
}

resource "aws_db_instance" "weir" {
  identifier                   = local.prefix
  engine                       = "postgres"
  engine_version               = "16"
  instance_class               = var.db_instance_class
  allocated_storage            = var.db_allocated_gib
  max_allocated_storage        = var.db_allocated_gib * 4
  storage_type                 = "gp3"
  storage_encrypted            = true
  kms_key_id                   = aws_kms_key.weir.arn
  db_name                      = "weir"
  username                     = "weir"
  password                     = data.aws_secretsmanager_random_password.db.random_password
  db_subnet_group_name         = aws_db_subnet_group.weir.name
  vpc_security_group_ids       = [aws_security_group.db.id]
  parameter_group_name         = aws_db_parameter_group.weir.name
  multi_az                     = var.db_multi_az
  backup_retention_period      = 14
  deletion_protection          = true
  skip_final_snapshot          = false
  final_snapshot_identifier    = "${local.prefix}-final"
  performance_insights_enabled = true
  auto_minor_version_upgrade   = true
  copy_tags_to_snapshot        = true

  # The generator gives a new value on every read; the first one is kept (rotate by hand).
  lifecycle {
    ignore_changes = [password]
  }
}

# The connection URL the tasks read as DATABASE_URL.
resource "aws_secretsmanager_secret" "database_url" {
  name       = "${local.prefix}/database-url"
  kms_key_id = aws_kms_key.weir.arn
}

resource "aws_secretsmanager_secret_version" "database_url" {
  secret_id     = aws_secretsmanager_secret.database_url.id
  secret_string = "postgres://weir:${data.aws_secretsmanager_random_password.db.random_password}@${aws_db_instance.weir.address}:5432/weir?sslmode=require"

  lifecycle {
    ignore_changes = [secret_string]
  }
}
