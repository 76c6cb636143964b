# `terraform test` with a mocked AWS provider: checks the module's own logic (what it creates
# for which settings, what every weir container is told, the release order, autoscaling,
# exposure, versioning) without an AWS account. The IAM documents themselves are checked with
# the real provider in policies.tftest.hcl.

mock_provider "aws" {
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_data "aws_iam_policy_document" {
    defaults = { json = "{\"Version\":\"2012-10-17\",\"Statement\":[]}" }
  }
  mock_data "aws_secretsmanager_random_password" {
    defaults = { random_password = "generatedpassword0123456789" }
  }
  mock_resource "aws_msk_cluster" {
    defaults = { bootstrap_brokers_sasl_scram = "b-1.weir:9096,b-2.weir:9096", arn = "arn:aws:kafka:eu-west-1:123456789012:cluster/weir/1" }
  }
  mock_resource "aws_db_instance" {
    defaults = {
      address            = "weir.abc.eu-west-1.rds.amazonaws.com"
      identifier         = "weir-test"
      master_user_secret = [{ secret_arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:rds!db-master", kms_key_id = "k", secret_status = "active" }]
    }
  }
  mock_resource "aws_ecs_cluster" {
    defaults = { arn = "arn:aws:ecs:eu-west-1:123456789012:cluster/weir-test", name = "weir-test" }
  }
  mock_resource "aws_prometheus_workspace" {
    defaults = { arn = "arn:aws:aps:eu-west-1:123456789012:workspace/ws-1", prometheus_endpoint = "https://aps-workspaces.eu-west-1.amazonaws.com/workspaces/ws-1/", id = "ws-1" }
  }
  mock_resource "aws_sns_topic" {
    defaults = { arn = "arn:aws:sns:eu-west-1:123456789012:weir-test-alarms" }
  }
  mock_resource "aws_cloudwatch_log_group" {
    defaults = { arn = "arn:aws:logs:eu-west-1:123456789012:log-group:/weir-test/x" }
  }
  mock_resource "aws_vpc_endpoint" {
    defaults = { prefix_list_id = "pl-12345678" }
  }
  mock_resource "aws_security_group" {
    defaults = { id = "sg-0123" }
  }
  mock_resource "aws_secretsmanager_secret" {
    defaults = { arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:weir-abc" }
  }
  mock_resource "aws_kms_key" {
    defaults = { arn = "arn:aws:kms:eu-west-1:123456789012:key/abc" }
  }
  mock_resource "aws_lb" {
    defaults = { arn = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/app/weir/1", dns_name = "weir-gateway.elb.amazonaws.com", arn_suffix = "app/weir/1" }
  }
  mock_resource "aws_lb_target_group" {
    defaults = { arn = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/weir/1", arn_suffix = "targetgroup/weir/1" }
  }
  mock_resource "aws_lb_listener" {
    defaults = { arn = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:listener/app/weir/1/l" }
  }
  mock_resource "aws_msk_configuration" {
    defaults = { arn = "arn:aws:kafka:eu-west-1:123456789012:configuration/weir/1", latest_revision = 1 }
  }
  mock_resource "aws_iam_role" {
    defaults = { arn = "arn:aws:iam::123456789012:role/weir" }
  }
  mock_resource "aws_ecs_task_definition" {
    defaults = { arn = "arn:aws:ecs:eu-west-1:123456789012:task-definition/weir:1" }
  }
  mock_resource "aws_ecr_pull_through_cache_rule" {
    defaults = {}
  }
  mock_resource "aws_s3_bucket" {
    defaults = { arn = "arn:aws:s3:::weir-cas-1", id = "weir-cas-1" }
  }
  mock_resource "aws_service_discovery_service" {
    defaults = { arn = "arn:aws:servicediscovery:eu-west-1:123456789012:service/srv-1" }
  }
  mock_resource "aws_ecr_repository" {
    defaults = { repository_url = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/weir" }
  }
}

variables {
  name                    = "weir-test"
  region                  = "eu-west-1"
  vpc_id                  = "vpc-0123"
  private_subnet_ids      = ["subnet-a", "subnet-b", "subnet-c"]
  private_route_table_ids = ["rtb-a"]
  gateway_certificate_arn = "arn:aws:acm:eu-west-1:123456789012:certificate/x"
  task_runner             = "tests/fake-run-task"
}

run "defaults_run_every_processor_and_the_registry" {
  command = apply

  assert {
    condition     = toset(keys(aws_ecs_service.processor)) == toset(["materializer", "coordinator", "cache", "relay", "gateway"])
    error_message = "every processor runs as a service"
  }
  assert {
    condition     = length(aws_ecs_service.registry) == 1 && local.registry_url == "http://registry.weir-test.internal:8080/apis/ccompat/v7"
    error_message = "without schema_registry_url the module runs Apicurio"
  }
  assert {
    condition     = length(aws_lb_listener.gateway_http) == 0 && length(aws_lb_listener.gateway_https) == 1 && aws_lb.gateway.internal
    error_message = "with a certificate and no public subnets the gateway is internal HTTPS"
  }
  assert {
    condition     = jsondecode(aws_ecs_task_definition.processor["materializer"].container_definitions)[0].command == ["run", "materializer"]
    error_message = "each service runs `weir run <name>`"
  }
  assert {
    condition = contains(
      [for e in jsondecode(aws_ecs_task_definition.processor["relay"].container_definitions)[0].environment : "${e.name}=${e.value}"],
      "KAFKA_BOOTSTRAP_SERVERS=b-1.weir:9096,b-2.weir:9096"
    )
    error_message = "the tasks get MSK's SASL/SCRAM bootstrap servers"
  }
  assert {
    condition     = alltrue([for s in jsondecode(aws_ecs_task_definition.processor["cache"].container_definitions)[0].secrets : startswith(s.valueFrom, "arn:aws:secretsmanager:")])
    error_message = "secrets are injected by reference, never as plain values"
  }
  assert {
    condition     = !strcontains(aws_ecs_task_definition.processor["gateway"].container_definitions, "generatedpassword")
    error_message = "no password appears in a task definition"
  }
  assert {
    condition     = aws_secretsmanager_secret_version.database_url.secret_string == "postgres://weir_app:generatedpassword0123456789@weir.abc.eu-west-1.rds.amazonaws.com:5432/weir?sslmode=require"
    error_message = "DATABASE_URL is built from the generated password and the RDS address, TLS required"
  }
}

run "existing_registry_and_https" {
  command = plan

  variables {
    schema_registry_url     = "https://registry.example.com"
    gateway_certificate_arn = "arn:aws:acm:eu-west-1:123456789012:certificate/x"
    public_subnet_ids       = ["subnet-p1", "subnet-p2"]
    processors = {
      materializer = { cpu = 1024, memory = 2048, desired_count = 1, max_count = 2 }
    }
  }

  assert {
    condition     = length(aws_ecs_service.registry) == 0 && local.registry_url == "https://registry.example.com"
    error_message = "an existing registry is used as given"
  }
  assert {
    condition     = length(aws_lb_listener.gateway_https) == 1 && length(aws_lb_listener.gateway_http) == 0 && !aws_lb.gateway.internal
    error_message = "a certificate and public subnets give a public HTTPS listener"
  }
  assert {
    condition     = keys(aws_ecs_service.processor) == ["materializer"]
    error_message = "only the listed processors run"
  }
  assert {
    condition     = length(aws_lb_listener.gateway_redirect) == 1 && one(aws_lb_listener.gateway_redirect[0].default_action).type == "redirect" && one(one(aws_lb_listener.gateway_redirect[0].default_action).redirect).protocol == "HTTPS"
    error_message = "with a certificate, port 80 only redirects to HTTPS"
  }
  assert {
    condition     = one(aws_lb_listener.gateway_https[0].default_action).type == "fixed-response"
    error_message = "the HTTPS listener forwards nothing by default (unknown paths get the load balancer's 404)"
  }
  assert {
    condition     = !anytrue([for p in one(aws_lb_listener_rule.gateway_api.condition).path_pattern[0].values : p == "/*" || strcontains(p, "metrics")])
    error_message = "/metrics is never routed by the load balancer, nor is everything"
  }
}

run "release_runs_setup_before_services" {
  command = apply

  assert {
    condition     = terraform_data.release.triggers_replace[0] == aws_ecs_task_definition.setup.arn && terraform_data.release.triggers_replace[1] == "123456789012.dkr.ecr.eu-west-1.amazonaws.com/weir:latest"
    error_message = "a new setup revision or a new image is a new release (its setup runs again)"
  }
  assert {
    condition = alltrue([for k, s in aws_ecs_service.processor :
    s.task_definition == terraform_data.release.output[k] && s.task_definition == "weir-test-${k}:${aws_ecs_task_definition.processor[k].revision}"])
    error_message = "services take their task definitions (family:revision) from the release, which exists only after its setup succeeded, not from the task definitions directly"
  }
  assert {
    condition     = terraform_data.release.id != "" && length(regexall("(?m)^weir-test\\|arn:aws:ecs:eu-west-1:123456789012:task-definition/weir:1\\|subnet-a,subnet-b,subnet-c\\|sg-0123$", file("tests/.runs.log"))) >= 1
    error_message = "apply ran the setup task (cluster, setup task definition, private subnets, tasks' security group)"
  }
  assert {
    condition     = jsondecode(aws_ecs_task_definition.setup.container_definitions)[0].entryPoint == ["/usr/local/lib/weir/setup"]
    error_message = "the setup task runs infra/aws/setup (migrate as master, roles, topics, schemas, doctor)"
  }
  assert {
    condition = toset([for s in jsondecode(aws_ecs_task_definition.setup.container_definitions)[0].secrets : s.name]) == toset([
      "DATABASE_URL", "WEIR__KAFKA__CONSUMER__SASL__PASSWORD", "WEIR__KAFKA__PRODUCER__SASL__PASSWORD",
      "WEIR_SETUP_MASTER_USER", "WEIR_SETUP_MASTER_PASSWORD", "WEIR_SETUP_APP_PASSWORD", "WEIR_SETUP_REGISTRY_PASSWORD",
    ])
    error_message = "only the setup task gets the master user's secret and the role passwords"
  }
  assert {
    condition     = alltrue([for k, td in aws_ecs_task_definition.processor : !anytrue([for s in jsondecode(td.container_definitions)[0].secrets : startswith(s.name, "WEIR_SETUP_")])])
    error_message = "no service gets the master user's secret"
  }
  assert {
    condition     = startswith(aws_secretsmanager_secret_version.database_url.secret_string, "postgres://weir_app:")
    error_message = "the application connects as weir_app, not the master user"
  }
  assert {
    condition     = aws_db_instance.weir.username == "weir_admin" && aws_db_instance.weir.manage_master_user_password
    error_message = "the master user is weir_admin with an RDS-managed password"
  }
  assert {
    condition = alltrue([for k, td in aws_ecs_task_definition.processor : alltrue([
      for e in jsondecode(td.container_definitions)[0].environment : !contains(local.forbidden_environment, e.name) && !strcontains(e.value, "127.0.0.1") && e.value != "weir-secret-key"
    ])])
    error_message = "no local-stack endpoint or static S3 credentials reach AWS"
  }
  assert {
    condition     = contains([for e in jsondecode(aws_ecs_task_definition.processor["cache"].container_definitions)[0].environment : "${e.name}=${e.value}"], "WEIR__S3__PROFILE=aws")
    error_message = "the S3 profile is aws (local-stack defaults refused)"
  }
}

run "autoscaling" {
  command = plan

  assert {
    condition     = toset(keys(aws_appautoscaling_policy.consumer_lag)) == toset(["materializer", "coordinator", "cache"])
    error_message = "every consumer scales on its lag"
  }
  assert {
    condition     = toset(keys(aws_appautoscaling_policy.processor_cpu)) == toset(["materializer", "coordinator", "cache", "relay", "gateway"])
    error_message = "every service also scales on CPU"
  }
  assert {
    condition     = [for m in one(one(aws_appautoscaling_policy.consumer_lag["coordinator"].target_tracking_scaling_policy_configuration).customized_metric_specification).metrics : m.expression if m.id == "backlog_per_task"][0] == "IF(tasks > 0, lag * 24 / tasks, lag * 24)"
    error_message = "the lag policy tracks records behind per running task (24 partitions)"
  }
  assert {
    condition = [for m in one(one(aws_appautoscaling_policy.consumer_lag["coordinator"].target_tracking_scaling_policy_configuration).customized_metric_specification).metrics :
    one(one(m.metric_stat).metric).dimensions if m.id == "lag"][0] == toset([{ name = "group", value = "weir-coordinator" }])
    error_message = "the coordinator's policy reads its own group's lag"
  }
  assert {
    condition     = one(aws_appautoscaling_policy.consumer_lag["cache"].target_tracking_scaling_policy_configuration).target_value == 10000
    error_message = "per-processor default backlog targets"
  }
  assert {
    condition     = one(one(aws_appautoscaling_policy.gateway_requests["gateway"].target_tracking_scaling_policy_configuration).predefined_metric_specification).predefined_metric_type == "ALBRequestCountPerTarget" && one(aws_appautoscaling_policy.gateway_requests["gateway"].target_tracking_scaling_policy_configuration).target_value == 300000
    error_message = "the gateway scales on requests per target (5,000/s per task = 300,000 per minute)"
  }
  assert {
    condition     = aws_appautoscaling_target.processor["materializer"].min_capacity == 2 && aws_appautoscaling_target.processor["materializer"].max_capacity == 8
    error_message = "min and max come from desired_count and max_count"
  }
  assert {
    condition     = yamldecode(local.collector_config).receivers.prometheus.config.scrape_configs[0].job_name == "weir" && yamldecode(local.collector_config).exporters.awsemf.metric_declarations[0].metric_name_selectors == ["^weir_consumer_lag$"]
    error_message = "the collector scrapes as job weir (the alert rules' job) and publishes the lag gauge"
  }
}

run "consumers_bounded_by_partitions" {
  command = plan
  variables {
    kafka_partitions = 6
    processors = {
      materializer = { cpu = 1024, memory = 2048, desired_count = 2, max_count = 8 }
    }
  }
  expect_failures = [aws_appautoscaling_target.processor]
}

run "public_without_certificate_refused" {
  command = plan
  variables {
    gateway_certificate_arn  = ""
    public_subnet_ids        = ["subnet-p1", "subnet-p2"]
    gateway_allow_plain_http = true
  }
  expect_failures = [aws_lb.gateway]
}

run "internal_plain_http_only_when_asked" {
  command = plan
  variables {
    gateway_certificate_arn = ""
  }
  expect_failures = [aws_lb.gateway]
}

run "internal_plain_http_allowed" {
  command = plan
  variables {
    gateway_certificate_arn  = ""
    gateway_allow_plain_http = true
  }
  assert {
    condition     = length(aws_lb_listener.gateway_http) == 1 && length(aws_lb_listener.gateway_redirect) == 0 && aws_lb.gateway.internal
    error_message = "an internal load balancer may serve plain HTTP when explicitly allowed"
  }
}

run "versioning_and_retention" {
  command = plan
  assert {
    condition     = one(aws_s3_bucket_versioning.cas.versioning_configuration).status == "Enabled"
    error_message = "the CAS bucket is versioned (weir's GC deletes from it)"
  }
  assert {
    condition     = [for r in aws_s3_bucket_lifecycle_configuration.cas.rule : one(r.noncurrent_version_expiration).noncurrent_days if r.id == "keep-deleted-blobs"][0] >= aws_db_instance.weir.backup_retention_period
    error_message = "deleted blobs are kept at least as long as the database backups"
  }
  assert {
    condition     = toset(aws_db_instance.weir.enabled_cloudwatch_logs_exports) == toset(["postgresql", "upgrade"])
    error_message = "RDS logs go to CloudWatch"
  }
  assert {
    condition     = contains([for e in jsondecode(aws_ecs_task_definition.setup.container_definitions)[0].environment : "${e.name}=${e.value}"], "WEIR__KAFKA__DLQ_RETENTION_MS=2592000000")
    error_message = "the setup task gives the dead-letter topic 30 days by default"
  }
  assert {
    condition     = aws_db_instance.weir.engine_version == "16.8" && !aws_db_instance.weir.auto_minor_version_upgrade
    error_message = "the Postgres minor is pinned"
  }
}

run "noncurrent_retention_shorter_than_backups_refused" {
  command = plan
  variables {
    db_backup_retention_days      = 30
    cas_noncurrent_retention_days = 14
  }
  expect_failures = [aws_s3_bucket.cas]
}

run "brokers_multiple_of_subnets" {
  command = plan
  variables {
    kafka_broker_count = 4
  }
  expect_failures = [aws_msk_cluster.weir]
}

run "old_postgres_minor_refused" {
  command = plan
  variables {
    db_engine_version = "16.3"
  }
  expect_failures = [var.db_engine_version]
}

run "connections_must_fit" {
  command = plan
  variables {
    db_max_server_connections = 200
  }
  expect_failures = [aws_db_instance.weir]
}

run "rejects_bad_names" {
  command = plan
  variables {
    name = "Weir_Prod"
  }
  expect_failures = [var.name]
}

run "rejects_unknown_processors" {
  command = plan
  variables {
    processors = {
      materialiser = { cpu = 1024, memory = 2048, desired_count = 1, max_count = 2 }
    }
  }
  expect_failures = [var.processors]
}
