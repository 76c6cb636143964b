# The IAM policy documents themselves (terraform/modules/policies), rendered by the real AWS
# provider: its policy document data source makes no AWS call, so nothing is mocked and the
# assertions read the JSON that IAM would get. Plan only: nothing is created.

provider "aws" {
  region                      = "eu-west-1"
  access_key                  = "test"
  secret_key                  = "test"
  skip_credentials_validation = true
  skip_requesting_account_id  = true
  skip_metadata_api_check     = true
  skip_region_validation      = true
}

variables {
  account_id                      = "123456789012"
  region                          = "eu-west-1"
  prefix                          = "weir-test"
  database_url_secret_arn         = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:weir-test/database-url-a"
  kafka_secret_arn                = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:AmazonMSK_weir-test-a"
  embedder_secret_arn             = ""
  kms_key_arn                     = "arn:aws:kms:eu-west-1:123456789012:key/k1"
  db_app_password_secret_arn      = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:weir-test/database-app-password-a"
  db_registry_password_secret_arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:weir-test/database-registry-password-a"
  db_master_secret_arn            = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:rds!db-master"
  cas_bucket_arn                  = "arn:aws:s3:::weir-test-cas-1"
  prometheus_workspace_arn        = "arn:aws:aps:eu-west-1:123456789012:workspace/ws-1"
  cluster_arn                     = "arn:aws:ecs:eu-west-1:123456789012:cluster/weir-test"
  cluster_name                    = "weir-test"
  metrics_log_group_arn           = "arn:aws:logs:eu-west-1:123456789012:log-group:/weir-test/metrics"
  pull_through_repositories       = ["arn:aws:ecr:eu-west-1:123456789012:repository/weir-test-ecr-public/*"]
}

run "policy_documents" {
  command = plan
  module {
    source = "./modules/policies"
  }

  # weir's own role: the CAS bucket and the key, nothing else; it cannot destroy versions.
  assert {
    condition = toset(flatten([for s in jsondecode(output.task).Statement : s.Resource])) == toset([
      "arn:aws:s3:::weir-test-cas-1/*", "arn:aws:s3:::weir-test-cas-1", "arn:aws:kms:eu-west-1:123456789012:key/k1",
    ])
    error_message = "the task role names only the CAS bucket, its objects and the weir key"
  }
  assert {
    condition     = !anytrue([for s in jsondecode(output.task).Statement : anytrue([for a in flatten([s.Action]) : a == "s3:DeleteObjectVersion" || a == "s3:*" || endswith(a, ":*")])])
    error_message = "weir cannot delete object versions nor use wildcard actions"
  }
  # Processors' execution role: their own secrets, not the master user's.
  assert {
    condition = toset(flatten([for s in jsondecode(output.execution_secrets).Statement : s.Resource if s.Sid == "Secrets"])) == toset([
      "arn:aws:secretsmanager:eu-west-1:123456789012:secret:weir-test/database-url-a",
      "arn:aws:secretsmanager:eu-west-1:123456789012:secret:AmazonMSK_weir-test-a",
    ])
    error_message = "the services' execution role reads DATABASE_URL and the Kafka secret only"
  }
  assert {
    condition     = contains(flatten([for s in jsondecode(output.execution_setup).Statement : s.Resource if s.Sid == "Secrets"]), "arn:aws:secretsmanager:eu-west-1:123456789012:secret:rds!db-master")
    error_message = "only the setup task's execution role reads the master user's secret"
  }
  # The collector: remote write to its workspace, its log group, discovery in its cluster.
  assert {
    condition     = [for s in jsondecode(output.collector).Statement : s.Resource if s.Sid == "RemoteWrite"][0] == "arn:aws:aps:eu-west-1:123456789012:workspace/ws-1"
    error_message = "the collector writes only to its workspace"
  }
  assert {
    condition     = [for s in jsondecode(output.collector).Statement : s.Condition.ArnEquals["ecs:cluster"] if s.Sid == "DiscoverClusterTasks"][0] == "arn:aws:ecs:eu-west-1:123456789012:cluster/weir-test"
    error_message = "the collector lists tasks of its cluster only"
  }
  # The API key task: create secrets under the deployment's api-keys prefix only.
  assert {
    condition     = [for s in jsondecode(output.api_key).Statement : s.Resource if s.Sid == "StoreKeys"][0] == "arn:aws:secretsmanager:eu-west-1:123456789012:secret:weir-test/api-keys/*"
    error_message = "the API key task stores only under <name>/api-keys/"
  }
  # Tasks' assume-role policy is limited to this account.
  assert {
    condition     = jsondecode(output.ecs_assume).Statement[0].Condition.StringEquals["aws:SourceAccount"] == "123456789012"
    error_message = "only this account's ECS tasks assume the roles"
  }
}
