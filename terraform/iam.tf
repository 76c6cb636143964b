# Roles. Execution roles (what ECS does to start a task: pull the image, write logs, read the
# secrets injected into it) are split so each task can read only its own secrets; task roles
# (what the code in the task may do) name their resources.



locals {
  # Images through the pull-through caches: the first pull creates the cached repository.
  pull_through_repositories = [
    "arn:aws:ecr:${var.region}:${data.aws_caller_identity.current.account_id}:repository/${aws_ecr_pull_through_cache_rule.ecr_public.ecr_repository_prefix}/*",
    "arn:aws:ecr:${var.region}:${data.aws_caller_identity.current.account_id}:repository/${aws_ecr_pull_through_cache_rule.quay.ecr_repository_prefix}/*",
  ]
}

# --- processors, the collector and the API key task -------------------------------------------

resource "aws_iam_role" "execution" {
  name               = "${local.prefix}-execution"
  assume_role_policy = module.policies.ecs_assume
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}



resource "aws_iam_role_policy" "execution_secrets" {
  name   = "secrets"
  role   = aws_iam_role.execution.id
  policy = module.policies.execution_secrets
}

# --- the setup task: also the master user's secret and the role passwords ---------------------

resource "aws_iam_role" "execution_setup" {
  name               = "${local.prefix}-execution-setup"
  assume_role_policy = module.policies.ecs_assume
}

resource "aws_iam_role_policy_attachment" "execution_setup" {
  role       = aws_iam_role.execution_setup.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}



resource "aws_iam_role_policy" "execution_setup" {
  name   = "secrets"
  role   = aws_iam_role.execution_setup.id
  policy = module.policies.execution_setup
}

# --- the registry: its own password only ------------------------------------------------------

resource "aws_iam_role" "execution_registry" {
  count              = local.run_registry ? 1 : 0
  name               = "${local.prefix}-execution-registry"
  assume_role_policy = module.policies.ecs_assume
}

resource "aws_iam_role_policy_attachment" "execution_registry" {
  count      = local.run_registry ? 1 : 0
  role       = aws_iam_role.execution_registry[0].name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}



resource "aws_iam_role_policy" "execution_registry" {
  count  = local.run_registry ? 1 : 0
  name   = "secrets"
  role   = aws_iam_role.execution_registry[0].id
  policy = module.policies.execution_registry
}

# --- weir itself: only the CAS bucket, with the weir key ----------------------------------------

resource "aws_iam_role" "task" {
  name               = "${local.prefix}-task"
  assume_role_policy = module.policies.ecs_assume
}



resource "aws_iam_role_policy" "task" {
  name   = "cas"
  role   = aws_iam_role.task.id
  policy = module.policies.task
}

# --- the collector: discover the tasks, write to AMP and the backlog log group --------------------

resource "aws_iam_role" "collector" {
  name               = "${local.prefix}-collector"
  assume_role_policy = module.policies.ecs_assume
}



resource "aws_iam_role_policy" "collector" {
  name   = "collector"
  role   = aws_iam_role.collector.id
  policy = module.policies.collector
}

# --- the API key task: store new keys under <name>/api-keys/ --------------------------------------

resource "aws_iam_role" "api_key" {
  name               = "${local.prefix}-api-key"
  assume_role_policy = module.policies.ecs_assume
}



resource "aws_iam_role_policy" "api_key" {
  name   = "api-keys"
  role   = aws_iam_role.api_key.id
  policy = module.policies.api_key
}

# --- RDS enhanced monitoring ------------------------------------------------------------------------

data "aws_iam_policy_document" "rds_monitoring_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["monitoring.rds.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "rds_monitoring" {
  name               = "${local.prefix}-rds-monitoring"
  assume_role_policy = data.aws_iam_policy_document.rds_monitoring_assume.json
}

resource "aws_iam_role_policy_attachment" "rds_monitoring" {
  role       = aws_iam_role.rds_monitoring.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonRDSEnhancedMonitoringRole"
}

module "policies" {
  source                          = "./modules/policies"
  account_id                      = data.aws_caller_identity.current.account_id
  region                          = var.region
  prefix                          = local.prefix
  database_url_secret_arn         = aws_secretsmanager_secret.database_url.arn
  kafka_secret_arn                = aws_secretsmanager_secret.kafka.arn
  embedder_secret_arn             = var.embedder_api_key_secret_arn
  kms_key_arn                     = aws_kms_key.weir.arn
  db_app_password_secret_arn      = aws_secretsmanager_secret.db_app_password.arn
  db_registry_password_secret_arn = aws_secretsmanager_secret.db_registry_password.arn
  db_master_secret_arn            = aws_db_instance.weir.master_user_secret[0].secret_arn
  cas_bucket_arn                  = aws_s3_bucket.cas.arn
  prometheus_workspace_arn        = aws_prometheus_workspace.weir.arn
  cluster_arn                     = aws_ecs_cluster.weir.arn
  cluster_name                    = aws_ecs_cluster.weir.name
  metrics_log_group_arn           = aws_cloudwatch_log_group.metrics.arn
  pull_through_repositories       = local.pull_through_repositories
}
