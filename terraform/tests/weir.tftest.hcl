# `terraform test` with a mocked AWS provider: checks the module's own logic (what it creates
# for which settings, what every weir container is told) without an AWS account.

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
    defaults = { address = "weir.abc.eu-west-1.rds.amazonaws.com" }
  }
  mock_resource "aws_secretsmanager_secret" {
    defaults = { arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:weir-abc" }
  }
  mock_resource "aws_kms_key" {
    defaults = { arn = "arn:aws:kms:eu-west-1:123456789012:key/abc" }
  }
  mock_resource "aws_lb" {
    defaults = { arn = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/app/weir/1", dns_name = "weir-gateway.elb.amazonaws.com" }
  }
  mock_resource "aws_lb_target_group" {
    defaults = { arn = "arn:aws:elasticloadbalancing:eu-west-1:123456789012:targetgroup/weir/1" }
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
  name               = "weir-test"
  region             = "eu-west-1"
  vpc_id             = "vpc-0123"
  private_subnet_ids = ["subnet-a", "subnet-b"]
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
    condition     = length(aws_lb_listener.gateway_http) == 1 && length(aws_lb_listener.gateway_https) == 0 && aws_lb.gateway.internal
    error_message = "without a certificate and public subnets the gateway is internal HTTP"
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
    condition     = aws_secretsmanager_secret_version.database_url.secret_string == "postgres://weir:generatedpassword0123456789@weir.abc.eu-west-1.rds.amazonaws.com:5432/weir?sslmode=require"
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
