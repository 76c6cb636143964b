data "aws_caller_identity" "current" {}

locals {
  prefix       = var.name
  weir_image   = var.weir_image != "" ? var.weir_image : "${aws_ecr_repository.weir.repository_url}:${var.weir_image_tag}"
  run_registry = var.schema_registry_url == ""
  registry_url = local.run_registry ? "http://registry.${local.prefix}.internal:8080/apis/ccompat/v7" : var.schema_registry_url
  gateway_port = 8080
  metrics_port = 9464
}

# One key for everything weir stores at rest: MSK, RDS, S3, secrets, logs.
resource "aws_kms_key" "weir" {
  description             = "${local.prefix}: Kafka, Postgres, CAS and secrets at rest"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

data "aws_iam_policy_document" "kms" {
  statement {
    sid       = "Account"
    actions   = ["kms:*"]
    resources = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["arn:aws:iam::${data.aws_caller_identity.current.account_id}:root"]
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
