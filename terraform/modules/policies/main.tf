# The IAM policy documents of the module's roles, as a module of their own so that
# `terraform test` renders them with the real AWS provider from plain inputs
# (terraform/tests/policies.tftest.hcl) instead of mocking them away.

terraform {
  required_providers {
    aws = {
      source = "hashicorp/aws"
    }
  }
}

variable "account_id" {
  type = string
}

variable "region" {
  type = string
}

variable "prefix" {
  type = string
}

variable "database_url_secret_arn" {
  type = string
}

variable "kafka_secret_arn" {
  type = string
}

variable "embedder_secret_arn" {
  type = string
}

variable "kms_key_arn" {
  type = string
}

variable "db_app_password_secret_arn" {
  type = string
}

variable "db_registry_password_secret_arn" {
  type = string
}

variable "db_master_secret_arn" {
  type = string
}

variable "cas_bucket_arn" {
  type = string
}

variable "prometheus_workspace_arn" {
  type = string
}

variable "cluster_arn" {
  type = string
}

variable "cluster_name" {
  type = string
}

variable "metrics_log_group_arn" {
  type = string
}

variable "pull_through_repositories" {
  type = list(string)
}

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
      values   = [var.account_id]
    }
  }
}

data "aws_iam_policy_document" "execution_secrets" {
  statement {
    sid     = "Secrets"
    actions = ["secretsmanager:GetSecretValue"]
    resources = compact([
      var.database_url_secret_arn,
      var.kafka_secret_arn,
      var.embedder_secret_arn,
    ])
  }
  statement {
    sid       = "SecretsKey"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
  statement {
    sid       = "PullThroughCache"
    actions   = ["ecr:CreateRepository", "ecr:BatchImportUpstreamImage"]
    resources = var.pull_through_repositories
  }
}

data "aws_iam_policy_document" "execution_setup" {
  statement {
    sid     = "Secrets"
    actions = ["secretsmanager:GetSecretValue"]
    resources = [
      var.database_url_secret_arn,
      var.kafka_secret_arn,
      var.db_app_password_secret_arn,
      var.db_registry_password_secret_arn,
      var.db_master_secret_arn,
    ]
  }
  statement {
    sid       = "SecretsKey"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
}

data "aws_iam_policy_document" "execution_registry" {
  statement {
    sid       = "Secrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = [var.db_registry_password_secret_arn]
  }
  statement {
    sid       = "SecretsKey"
    actions   = ["kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
  statement {
    sid       = "PullThroughCache"
    actions   = ["ecr:CreateRepository", "ecr:BatchImportUpstreamImage"]
    resources = var.pull_through_repositories
  }
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
    resources = ["${var.cas_bucket_arn}/*"]
  }
  statement {
    sid       = "CasBucket"
    actions   = ["s3:ListBucket", "s3:ListBucketMultipartUploads"]
    resources = [var.cas_bucket_arn]
  }
  statement {
    sid       = "CasKey"
    actions   = ["kms:Encrypt", "kms:Decrypt", "kms:GenerateDataKey", "kms:DescribeKey"]
    resources = [var.kms_key_arn]
  }
}

data "aws_iam_policy_document" "collector" {
  statement {
    sid       = "RemoteWrite"
    actions   = ["aps:RemoteWrite"]
    resources = [var.prometheus_workspace_arn]
  }
  statement {
    sid       = "DiscoverClusterTasks"
    actions   = ["ecs:ListTasks", "ecs:ListServices"]
    resources = ["*"]
    condition {
      test     = "ArnEquals"
      variable = "ecs:cluster"
      values   = [var.cluster_arn]
    }
  }
  statement {
    sid     = "DescribeClusterTasks"
    actions = ["ecs:DescribeTasks", "ecs:DescribeServices", "ecs:DescribeContainerInstances"]
    resources = [
      "arn:aws:ecs:${var.region}:${var.account_id}:task/${var.cluster_name}/*",
      "arn:aws:ecs:${var.region}:${var.account_id}:service/${var.cluster_name}/*",
      "arn:aws:ecs:${var.region}:${var.account_id}:container-instance/${var.cluster_name}/*",
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
    resources = ["${var.metrics_log_group_arn}:*"]
  }
  statement {
    sid       = "MetricsKey"
    actions   = ["kms:GenerateDataKey", "kms:Decrypt"]
    resources = [var.kms_key_arn]
  }
}

data "aws_iam_policy_document" "api_key" {
  statement {
    sid       = "StoreKeys"
    actions   = ["secretsmanager:CreateSecret", "secretsmanager:TagResource"]
    resources = ["arn:aws:secretsmanager:${var.region}:${var.account_id}:secret:${var.prefix}/api-keys/*"]
  }
  statement {
    sid       = "KeysKey"
    actions   = ["kms:GenerateDataKey", "kms:Encrypt"]
    resources = [var.kms_key_arn]
  }
}

output "ecs_assume" {
  value = data.aws_iam_policy_document.ecs_assume.json
}

output "execution_secrets" {
  value = data.aws_iam_policy_document.execution_secrets.json
}

output "execution_setup" {
  value = data.aws_iam_policy_document.execution_setup.json
}

output "execution_registry" {
  value = data.aws_iam_policy_document.execution_registry.json
}

output "task" {
  value = data.aws_iam_policy_document.task.json
}

output "collector" {
  value = data.aws_iam_policy_document.collector.json
}

output "api_key" {
  value = data.aws_iam_policy_document.api_key.json
}

