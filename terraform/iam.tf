# Roles. Execution roles (what ECS does to start a task: pull the image, write logs, read the
# secrets injected into it) are split so each task can read only its own secrets; task roles
# (what the code in the task may do) name their resources.

data "aws_iam_policy_document" "ecs_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

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
  assume_role_policy = data.aws_iam_policy_document.ecs_assume.json
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "execution_secrets" {
  statement {
    sid     = "Secrets"
    actions = ["secretsmanager:GetSecretValue"]
    resources = compact([
      aws_secretsmanager_secret.database_url.arn,
      aws_secretsmanager_secret.kafka.arn,
      var.embedder_api_key_secret_arn,
    ])
  }
  statement {
    sid       = "SecretsKey"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.weir.arn]
  }
  statement {
    sid       = "PullThroughCache"
    actions   = ["ecr:CreateRepository", "ecr:BatchImportUpstreamImage"]
    resources = local.pull_through_repositories
  }
}

resource "aws_iam_role_policy" "execution_secrets" {
  name   = "secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.execution_secrets.json
}

# --- the setup task: also the master user's secret and the role passwords ---------------------

resource "aws_iam_role" "execution_setup" {
  name               = "${local.prefix}-execution-setup"
  assume_role_policy = data.aws_iam_policy_document.ecs_assume.json
}

resource "aws_iam_role_policy_attachment" "execution_setup" {
  role       = aws_iam_role.execution_setup.name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "execution_setup" {
  statement {
    sid     = "Secrets"
    actions = ["secretsmanager:GetSecretValue"]
    resources = [
      aws_secretsmanager_secret.database_url.arn,
      aws_secretsmanager_secret.kafka.arn,
      aws_secretsmanager_secret.db_app_password.arn,
      aws_secretsmanager_secret.db_registry_password.arn,
      aws_db_instance.weir.master_user_secret[0].secret_arn,
    ]
  }
  statement {
    sid       = "SecretsKey"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.weir.arn]
  }
}

resource "aws_iam_role_policy" "execution_setup" {
  name   = "secrets"
  role   = aws_iam_role.execution_setup.id
  policy = data.aws_iam_policy_document.execution_setup.json
}

# --- the registry: its own password only ------------------------------------------------------

resource "aws_iam_role" "execution_registry" {
  count              = local.run_registry ? 1 : 0
  name               = "${local.prefix}-execution-registry"
  assume_role_policy = data.aws_iam_policy_document.ecs_assume.json
}

resource "aws_iam_role_policy_attachment" "execution_registry" {
  count      = local.run_registry ? 1 : 0
  role       = aws_iam_role.execution_registry[0].name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

data "aws_iam_policy_document" "execution_registry" {
  statement {
    sid       = "Secrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [aws_secretsmanager_secret.db_registry_password.arn]
  }
  statement {
    sid       = "SecretsKey"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.weir.arn]
  }
  statement {
    sid       = "PullThroughCache"
    actions   = ["ecr:CreateRepository", "ecr:BatchImportUpstreamImage"]
    resources = local.pull_through_repositories
  }
}

resource "aws_iam_role_policy" "execution_registry" {
  count  = local.run_registry ? 1 : 0
  name   = "secrets"
  role   = aws_iam_role.execution_registry[0].id
  policy = data.aws_iam_policy_document.execution_registry.json
}

# --- weir itself: only the CAS bucket, with the weir key ----------------------------------------

resource "aws_iam_role" "task" {
  name               = "${local.prefix}-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_assume.json
}

data "aws_iam_policy_document" "task" {
  # DeleteObject on a versioned bucket only adds a delete marker: weir's GC can hide a blob,
  # never destroy a version (no s3:DeleteObjectVersion).
  statement {
    sid = "CasObjects"
    actions = [
      "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
      "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts",
    ]
    resources = ["${aws_s3_bucket.cas.arn}/*"]
  }
  statement {
    sid       = "CasBucket"
    actions   = ["s3:ListBucket", "s3:ListBucketMultipartUploads"]
    resources = [aws_s3_bucket.cas.arn]
  }
  statement {
    sid       = "CasKey"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = [aws_kms_key.weir.arn]
  }
}

resource "aws_iam_role_policy" "task" {
  name   = "cas"
  role   = aws_iam_role.task.id
  policy = data.aws_iam_policy_document.task.json
}

# --- the collector: discover the tasks, write to AMP and the backlog log group --------------------

resource "aws_iam_role" "collector" {
  name               = "${local.prefix}-collector"
  assume_role_policy = data.aws_iam_policy_document.ecs_assume.json
}

data "aws_iam_policy_document" "collector" {
  statement {
    sid       = "RemoteWrite"
    actions   = ["aps:RemoteWrite"]
    resources = [aws_prometheus_workspace.weir.arn]
  }
  statement {
    sid       = "DiscoverClusterTasks"
    actions   = ["ecs:ListTasks", "ecs:ListServices"]
    resources = ["*"]
    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [aws_ecs_cluster.weir.arn]
    }
  }
  statement {
    sid     = "DescribeClusterTasks"
    actions = ["ecs:DescribeTasks", "ecs:DescribeServices", "ecs:DescribeContainerInstances"]
    resources = [
      "arn:aws:ecs:${var.region}:${data.aws_caller_identity.current.account_id}:task/${aws_ecs_cluster.weir.name}/*",
      "arn:aws:ecs:${var.region}:${data.aws_caller_identity.current.account_id}:service/${aws_ecs_cluster.weir.name}/*",
      "arn:aws:ecs:${var.region}:${data.aws_caller_identity.current.account_id}:container-instance/${aws_ecs_cluster.weir.name}/*",
    ]
  }
  statement {
    # DescribeTaskDefinition supports no resource-level permissions.
    sid       = "DescribeTaskDefinitions"
    actions   = ["ecs:DescribeTaskDefinition"]
    resources = ["*"]
  }
  statement {
    sid       = "BacklogMetrics"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]
    resources = ["${aws_cloudwatch_log_group.metrics.arn}:*"]
  }
  statement {
    sid       = "MetricsKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [aws_kms_key.weir.arn]
  }
}

resource "aws_iam_role_policy" "collector" {
  name   = "collector"
  role   = aws_iam_role.collector.id
  policy = data.aws_iam_policy_document.collector.json
}

# --- the API key task: store new keys under <name>/api-keys/ --------------------------------------

resource "aws_iam_role" "api_key" {
  name               = "${local.prefix}-api-key"
  assume_role_policy = data.aws_iam_policy_document.ecs_assume.json
}

data "aws_iam_policy_document" "api_key" {
  statement {
    sid       = "StoreKeys"
    actions   = ["secretsmanager:CreateSecret", "secretsmanager:TagResource"]
    resources = ["arn:aws:secretsmanager:${var.region}:${data.aws_caller_identity.current.account_id}:secret:${local.prefix}/api-keys/*"]
  }
  statement {
    sid       = "KeysKey"
    actions   = ["kms:GenerateDataKey", "kms:Encrypt"]
    resources = [aws_kms_key.weir.arn]
  }
}

resource "aws_iam_role_policy" "api_key" {
  name   = "api-keys"
  role   = aws_iam_role.api_key.id
  policy = data.aws_iam_policy_document.api_key.json
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
