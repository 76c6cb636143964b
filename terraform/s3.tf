# The CAS bucket: content-addressed, immutable blobs (definitions, outputs, cache results).
# weir writes with SSE-KMS (cas.server_side_encryption = aws:kms); GC is weir's own, not a
# lifecycle rule, because only weir knows what is still referenced.

resource "aws_s3_bucket" "cas" {
  bucket_prefix = "${local.prefix}-cas-"
}

resource "aws_s3_bucket_public_access_block" "cas" {
  bucket                  = aws_s3_bucket.cas.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "cas" {
  bucket = aws_s3_bucket.cas.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "cas" {
  bucket = aws_s3_bucket.cas.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.weir.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "cas" {
  bucket = aws_s3_bucket.cas.id
  rule {
    id     = "abort-incomplete-multipart"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 2
    }
  }
}

data "aws_iam_policy_document" "cas_tls_only" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.cas.arn, "${aws_s3_bucket.cas.arn}/*"]
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

resource "aws_s3_bucket_policy" "cas" {
  bucket     = aws_s3_bucket.cas.id
  policy     = data.aws_iam_policy_document.cas_tls_only.json
  depends_on = [aws_s3_bucket_public_access_block.cas]
}
