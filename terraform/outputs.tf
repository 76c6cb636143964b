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

output "setup_command" {
  description = "Runs migrations, topic creation, schema registration and doctor once per release."
  value       = "aws ecs run-task --cluster ${aws_ecs_cluster.weir.name} --launch-type FARGATE --task-definition ${aws_ecs_task_definition.setup.family} --network-configuration 'awsvpcConfiguration={subnets=[${join(",", var.private_subnet_ids)}],securityGroups=[${aws_security_group.tasks.id}],assignPublicIp=DISABLED}'"
}
