data "aws_caller_identity" "current" {}

locals {
  prefix       = var.name
  weir_image   = var.weir_image != "" ? var.weir_image : "${aws_ecr_repository.weir.repository_url}:${var.weir_image_tag}"
  run_registry = var.schema_registry_url == ""
  registry_url = local.run_registry ? "http://registry.${local.prefix}.internal:8080/apis/ccompat/v7" : var.schema_registry_url
  gateway_port = 8080
  metrics_port = 9464

  # Third-party images come through ECR pull-through caches, so tasks pull only from ECR
  # (through its VPC endpoints) and never need a route to quay.io or ECR Public.
  ecr_registry     = "${data.aws_caller_identity.current.account_id}.dkr.ecr.${var.region}.amazonaws.com"
  apicurio_image   = var.apicurio_image != "" ? var.apicurio_image : "${local.ecr_registry}/${aws_ecr_pull_through_cache_rule.quay.ecr_repository_prefix}/apicurio/apicurio-registry:3.0.9"
  collector_image  = var.collector_image != "" ? var.collector_image : "${local.ecr_registry}/${aws_ecr_pull_through_cache_rule.ecr_public.ecr_repository_prefix}/aws-observability/aws-otel-collector:v0.40.0"
  aws_cli_image    = var.aws_cli_image != "" ? var.aws_cli_image : "${local.ecr_registry}/${aws_ecr_pull_through_cache_rule.ecr_public.ecr_repository_prefix}/aws-cli/aws-cli:2.17.0"
  consumer_inputs  = { materializer = "weir.patches.v1", coordinator = "weir.completions.v1", cache = "weir.cache.v1" }
  consumer_groups  = { materializer = "weir-materializer", coordinator = "weir-coordinator", cache = "weir-cache" }
  public_gateway   = length(var.public_subnet_ids) > 0
  gateway_https    = var.gateway_certificate_arn != ""
  db_master_user   = "weir_admin"
  db_app_user      = "weir_app"
  db_registry_user = "weir_registry"
}

# One key for everything weir stores at rest: MSK, RDS, S3, secrets, logs.
resource "aws_kms_key" "weir" {
  description             = "${local.prefix}: Kafka, Postgres, CAS and secrets at rest"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

data "aws_iam_policy_document" "kms" {
  # checkov:skip=CKV_AWS_109: a key policy's Resource "*" is the key itself; the account root statement is what lets IAM policies grant use of the key (AWS's default key policy)
  # checkov:skip=CKV_AWS_111: a key policy's Resource "*" is the key itself
  # checkov:skip=CKV_AWS_356: a key policy's Resource "*" is the key itself
  statement {
    sid       = "Account"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"]
    }
  }

  # CloudWatch alarms and Managed Prometheus' alert manager publish to the encrypted alarm
  # topic; SNS needs the key on their behalf.
  statement {
    sid       = "AlarmPublishers"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com", "aps.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }

  # CloudWatch Logs encrypts the log groups with this key.
  statement {
    sid       = "Logs"
    actions   = ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:Describe*"]
    resources = ["*"]
    principals {
      type        = "Service"
      identifiers = ["logs.${var.region}.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "kms:EncryptionContext:aws:logs:arn"
      values   = ["arn:aws:logs:${var.region}:${data.aws_caller_identity.current.account_id}:*"]
    }
  }
}

resource "aws_kms_alias" "weir" {
  name          = "alias/${local.prefix}"
  target_key_id = aws_kms_key.weir.key_id
}

resource "aws_ecr_repository" "weir" {
  name                 = local.prefix
  image_tag_mutability = "IMMUTABLE"

  image_scanning_configuration {
    scan_on_push = true
  }

  encryption_configuration {
    encryption_type = "KMS"
    kms_key         = aws_kms_key.weir.arn
  }
}

# Pull-through caches for the third-party images (the registry, the metrics collector, the AWS
# CLI of the API key task): the first pull copies the image into this account's ECR.
resource "aws_ecr_pull_through_cache_rule" "ecr_public" {
  ecr_repository_prefix = "${local.prefix}-ecr-public"
  upstream_registry_url = "public.ecr.aws"
}

resource "aws_ecr_pull_through_cache_rule" "quay" {
  ecr_repository_prefix = "${local.prefix}-quay"
  upstream_registry_url = "quay.io"
}
