# The settings every bucket shares (terraform/modules/bucket), planned with the real AWS
# provider: its policy document data source makes no AWS call, so the assertions read the
# policy S3 would get. Plan only: nothing is created.

provider "aws" {
  region                      = "eu-west-1"
  access_key                  = "test"
  secret_key                  = "test"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
}

run "kms_bucket_without_statements_of_its_own" {
  command = plan
  module {
    source = "./modules/bucket"
  }
  variables {
    bucket_id          = "weir-test-cas-1"
    bucket_arn         = "arn:aws:s3:::weir-test-cas-1"
    sse_algorithm      = "aws:kms"
    kms_key_arn        = "arn:aws:kms:eu-west-1:123456789012:key/k1"
    bucket_key_enabled = true
  }

  assert {
    condition = jsondecode(aws_s3_bucket_policy.this.policy).Statement == [{
      Sid       = "DenyInsecureTransport"
      Effect    = "Deny"
      Action    = "s3:*"
      Resource  = ["arn:aws:s3:::weir-test-cas-1/*", "arn:aws:s3:::weir-test-cas-1"]
      Principal = "*"
      Condition = { Bool = { "aws:SecureTransport" = "false" } }
    }]
    error_message = "the policy refuses every request to the bucket and its objects not made over TLS, and says nothing else"
  }
  assert {
    condition = alltrue([
      aws_s3_bucket_public_access_block.this.block_public_acls,
      aws_s3_bucket_public_access_block.this.block_public_policy,
      aws_s3_bucket_public_access_block.this.ignore_public_acls,
      aws_s3_bucket_public_access_block.this.restrict_public_buckets,
    ])
    error_message = "no public access in any form"
  }
  assert {
    condition     = one(aws_s3_bucket_ownership_controls.this.rule).object_ownership == "BucketOwnerEnforced"
    error_message = "the bucket owner owns every object (ACLs disabled)"
  }
  assert {
    condition = [for r in aws_s3_bucket_server_side_encryption_configuration.this.rule : {
      algorithm  = one(r.apply_server_side_encryption_by_default).sse_algorithm
      key        = one(r.apply_server_side_encryption_by_default).kms_master_key_id
      bucket_key = r.bucket_key_enabled
      }] == [{
      algorithm  = "aws:kms"
      key        = "arn:aws:kms:eu-west-1:123456789012:key/k1"
      bucket_key = true
    }]
    error_message = "SSE-KMS with the given key and S3 Bucket Keys"
  }
}

run "sse_s3_bucket_with_statements_of_its_own" {
  command = plan
  module {
    source = "./modules/bucket"
  }
  variables {
    bucket_id     = "weir-test-logs-1"
    bucket_arn    = "arn:aws:s3:::weir-test-logs-1"
    sse_algorithm = "AES256"
    policy_json = jsonencode({
      Version = "2012-10-17"
      Statement = [{
        Sid       = "S3ServerAccessLogs"
        Effect    = "Allow"
        Action    = "s3:PutObject"
        Resource  = "arn:aws:s3:::weir-test-logs-1/s3/*"
        Principal = { Service = "logging.s3.amazonaws.com" }
      }]
    })
  }

  assert {
    condition     = [for s in jsondecode(aws_s3_bucket_policy.this.policy).Statement : s.Sid] == ["S3ServerAccessLogs", "DenyInsecureTransport"]
    error_message = "the bucket's own statements come first, then the TLS-only one"
  }
  assert {
    condition = [for s in jsondecode(aws_s3_bucket_policy.this.policy).Statement : s.Resource if s.Sid == "DenyInsecureTransport"] == [[
      "arn:aws:s3:::weir-test-logs-1/*", "arn:aws:s3:::weir-test-logs-1",
    ]]
    error_message = "the TLS-only statement names this bucket and its objects"
  }
  assert {
    condition     = [for r in aws_s3_bucket_server_side_encryption_configuration.this.rule : one(r.apply_server_side_encryption_by_default).sse_algorithm] == ["AES256"]
    error_message = "SSE-S3 (load balancer access logs cannot go to an SSE-KMS bucket)"
  }
}
