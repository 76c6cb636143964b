# The CAS bucket: content-addressed, immutable blobs (definitions, outputs, cache results).
# weir writes with SSE-KMS (cas.server_side_encryption = aws:kms); GC is weir's own, not a
# lifecycle rule, because only weir knows what is still referenced. Versioning keeps what the
# GC deletes (a delete marker hides it) for cas_noncurrent_retention_days, at least as long as
# the database's backups: a database restored to any point in its backup window finds every
# blob it references (docs/deploy-aws.md, "Restore"). weir's role cannot delete versions.

resource "aws_s3_bucket" "cas" {
  # checkov:skip=CKV_AWS_144: cross-region replication is a disaster-recovery choice of the operator (a second region's bucket and key); in-region recovery is versioning plus RDS backups
  # checkov:skip=CKV2_AWS_62: nothing consumes the bucket's events; weir writes and reads it itself
  bucket_prefix = "${local.prefix}-cas-"

  lifecycle {
    precondition {
      condition     = var.cas_noncurrent_retention_days >= var.db_backup_retention_days
      error_message = "cas_noncurrent_retention_days must be at least db_backup_retention_days: a database restored from a backup must find the blobs it references."
    }
  }
}

resource "aws_s3_bucket_versioning" "cas" {
  bucket = aws_s3_bucket.cas.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_logging" "cas" {
  bucket        = aws_s3_bucket.cas.id
  target_bucket = aws_s3_bucket.lb_logs.id
  target_prefix = "s3/cas/"
}

# No public access, owner-owned objects, SSE-KMS by default, TLS only.
module "cas_bucket" {
  source             = "./modules/bucket"
  bucket_id          = aws_s3_bucket.cas.id
  bucket_arn         = aws_s3_bucket.cas.arn
  sse_algorithm      = "aws:kms"
  kms_key_arn        = aws_kms_key.weir.arn
  bucket_key_enabled = true
}

resource "aws_s3_bucket_lifecycle_configuration" "cas" {
  bucket     = aws_s3_bucket.cas.id
  depends_on = [aws_s3_bucket_versioning.cas]

  rule {
    id     = "keep-deleted-blobs"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.cas_noncurrent_retention_days
    }
    # A delete marker whose versions have all expired hides nothing any more.
    expiration {
      expired_object_delete_marker = true
    }
  }
  rule {
    id     = "abort-incomplete-multipart"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 2
    }
  }
}

# Access logs of the load balancer and the CAS bucket. SSE-S3: load balancer access logs
# cannot be written to a bucket encrypted with a KMS key.
resource "aws_s3_bucket" "lb_logs" {
  # checkov:skip=CKV_AWS_145: Elastic Load Balancing delivers access logs only to buckets encrypted with SSE-S3, not SSE-KMS
  # checkov:skip=CKV_AWS_18: this is the access log bucket; logging it into itself would loop
  # checkov:skip=CKV_AWS_144: logs stay in the deployment's region
  # checkov:skip=CKV2_AWS_62: nothing consumes the log bucket's events
  bucket_prefix = "${local.prefix}-logs-"
}

# No public access, owner-owned objects, SSE-S3 by default, TLS only; the log deliveries may
# write (the statements below).
module "lb_logs_bucket" {
  source        = "./modules/bucket"
  bucket_id     = aws_s3_bucket.lb_logs.id
  bucket_arn    = aws_s3_bucket.lb_logs.arn
  sse_algorithm = "AES256"
  policy_json   = data.aws_iam_policy_document.lb_logs.json
}

resource "aws_s3_bucket_versioning" "lb_logs" {
  bucket = aws_s3_bucket.lb_logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "lb_logs" {
  bucket     = aws_s3_bucket.lb_logs.id
  depends_on = [aws_s3_bucket_versioning.lb_logs]
  rule {
    id     = "expire-logs"
    status = "Enabled"
    filter {}
    expiration {
      days = var.log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 7
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 2
    }
  }
}

data "aws_iam_policy_document" "lb_logs" {
  statement {
    sid       = "LoadBalancerAccessLogs"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.lb_logs.arn}/gateway/AWSLogs/${data.aws_caller_identity.current.account_id}/*"]
    principals {
      type        = "Service"
      identifiers = ["logdelivery.elasticloadbalancing.amazonaws.com"]
    }
  }
  statement {
    sid       = "S3ServerAccessLogs"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.lb_logs.arn}/s3/*"]
    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

# The shared settings moved into modules/bucket: existing deployments keep their resources
# (renamed in the state, neither destroyed nor created again).

moved {
  from = aws_s3_bucket_public_access_block.cas
  to   = module.cas_bucket.aws_s3_bucket_public_access_block.this
}

moved {
  from = aws_s3_bucket_ownership_controls.cas
  to   = module.cas_bucket.aws_s3_bucket_ownership_controls.this
}

moved {
  from = aws_s3_bucket_server_side_encryption_configuration.cas
  to   = module.cas_bucket.aws_s3_bucket_server_side_encryption_configuration.this
}

moved {
  from = aws_s3_bucket_policy.cas
  to   = module.cas_bucket.aws_s3_bucket_policy.this
}

moved {
  from = aws_s3_bucket_public_access_block.lb_logs
  to   = module.lb_logs_bucket.aws_s3_bucket_public_access_block.this
}

moved {
  from = aws_s3_bucket_ownership_controls.lb_logs
  to   = module.lb_logs_bucket.aws_s3_bucket_ownership_controls.this
}

moved {
  from = aws_s3_bucket_server_side_encryption_configuration.lb_logs
  to   = module.lb_logs_bucket.aws_s3_bucket_server_side_encryption_configuration.this
}

moved {
  from = aws_s3_bucket_policy.lb_logs
  to   = module.lb_logs_bucket.aws_s3_bucket_policy.this
}
