# weir on AWS: MSK (Kafka), RDS PostgreSQL 16 with pgvector, S3 (the CAS), the schema registry
# and the weir processors on ECS Fargate. See docs/deploy-aws.md.
terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 7.0"
    }
  }
}

provider "aws" {
  region = var.region

  default_tags {
    tags = merge({ "app" = "weir", "weir:environment" = var.name }, var.tags)
  }
}
