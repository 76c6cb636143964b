output "gateway_url" {
  description = "Base URL of the weir gateway."
  value       = "${var.gateway_certificate_arn != "" ? "https" : "http"}://${aws_lb.gateway.dns_name}"
}

output "kafka_bootstrap_brokers" {
  description = "MSK bootstrap servers (SASL/SCRAM over TLS) for analytics consumers."
  value       = aws_msk_cluster.weir.bootstrap_brokers_sasl_scram
}

output "schema_registry_url" {
  description = "Confluent-compatible schema registry URL (inside the VPC)."
  value       = local.registry_url
}

output "cas_bucket" {
  description = "The CAS bucket."
  value       = aws_s3_bucket.cas.id
}

output "database_url_secret_arn" {
  description = "Secrets Manager ARN holding DATABASE_URL."
  value       = aws_secretsmanager_secret.database_url.arn
}

output "ecr_repository_url" {
  description = "Push the weir image here (docs/deploy-aws.md)."
  value       = aws_ecr_repository.weir.repository_url
}

output "setup_task" {
  description = "The setup task of the current release (migrations, roles, topics, schemas, doctor); terraform apply runs it before the services move."
  value = {
    cluster         = aws_ecs_cluster.weir.name
    task_definition = aws_ecs_task_definition.setup.arn
    subnets         = join(",", var.private_subnet_ids)
    security_groups = aws_security_group.tasks.id
    region          = var.region
  }
}

output "api_key_task" {
  description = "What scripts/create-api-key runs."
  value = {
    cluster         = aws_ecs_cluster.weir.name
    task_definition = aws_ecs_task_definition.api_key.arn
    subnets         = join(",", var.private_subnet_ids)
    security_groups = aws_security_group.tasks.id
    region          = var.region
    secret_prefix   = "${local.prefix}/api-keys/"
  }
}

output "prometheus_endpoint" {
  description = "Managed Prometheus query endpoint (the Grafana data source, SigV4)."
  value       = aws_prometheus_workspace.weir.prometheus_endpoint
}

output "alarm_topic_arn" {
  description = "SNS topic of the CloudWatch alarms and the Prometheus alerts."
  value       = aws_sns_topic.alarms.arn
}

output "database_master_secret_arn" {
  description = "Secrets Manager ARN of the RDS master user (managed and rotated by RDS; used only by the setup task)."
  value       = aws_db_instance.weir.master_user_secret[0].secret_arn
}
