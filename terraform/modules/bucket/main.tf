# The settings every bucket of the deployment shares: no public access in any form, the bucket
# owner owns every object (ACLs disabled), encryption at rest by default, and a bucket policy
# that refuses any request not made over TLS, after the bucket's own statements. The bucket
# itself, its versioning, lifecycle and logging stay with the caller: they differ per bucket.

terraform {
  required_providers {
    aws = {
      source = "hashicorp/aws"
    }
  }
}

variable "bucket_id" {
  description = "The bucket's name (aws_s3_bucket.x.id)."
  type        = string
}

variable "bucket_arn" {
  description = "The bucket's ARN (aws_s3_bucket.x.arn)."
  type        = string
}

variable "sse_algorithm" {
  description = "Default encryption: aws:kms (with kms_key_arn) or AES256 (SSE-S3)."
  type        = string
}

variable "kms_key_arn" {
  description = "The KMS key of aws:kms encryption; null for AES256."
  type        = string
  default     = null
}

variable "bucket_key_enabled" {
  description = "Whether S3 Bucket Keys cut the KMS requests of aws:kms encryption; null leaves it unset."
  type        = bool
  default     = null
}

variable "policy_json" {
  description = "The bucket's own policy statements (a policy document), placed before the TLS-only statement; null for none."
  type        = string
  default     = null
}

resource "aws_s3_bucket_public_access_block" "this" {
  bucket                  = var.bucket_id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "this" {
  bucket = var.bucket_id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  bucket = var.bucket_id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = var.sse_algorithm
      kms_master_key_id = var.kms_key_arn
    }
    bucket_key_enabled = var.bucket_key_enabled
  }
}

data "aws_iam_policy_document" "this" {
  # The source document's statements come first, then this one's.
  source_policy_documents = var.policy_json == null ? [] : [var.policy_json]

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [var.bucket_arn, "${var.bucket_arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "this" {
  bucket = var.bucket_id
  policy = data.aws_iam_policy_document.this.json
  # S3 refuses concurrent changes to a bucket's policy and its public access block.
  depends_on = [aws_s3_bucket_public_access_block.this]
}
