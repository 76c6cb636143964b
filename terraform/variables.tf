variable "name" {
  description = "Name of this deployment; prefixes every resource (e.g. weir-prod)."
  type        = string
  default     = "weir"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,30}$", var.name))
    error_message = "name must be 2-31 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "region" {
  description = "AWS region."
  type        = string
}

variable "tags" {
  description = "Extra tags for every resource."
  type        = map(string)
  default     = {}
}

variable "vpc_id" {
  description = "VPC to deploy into."
  type        = string
}

variable "private_subnet_ids" {
  description = "Private subnets (at least two, in different availability zones) for MSK, RDS and the tasks. They need a route to the AWS APIs (NAT or VPC endpoints for S3, ECR, Secrets Manager, CloudWatch Logs)."
  type        = list(string)

  validation {
    condition     = length(var.private_subnet_ids) >= 2
    error_message = "private_subnet_ids needs at least two subnets in different availability zones."
  }
}

variable "public_subnet_ids" {
  description = "Public subnets for the gateway's load balancer (empty: an internal load balancer in the private subnets)."
  type        = list(string)
  default     = []
}

variable "gateway_certificate_arn" {
  description = "ACM certificate for the gateway's HTTPS listener. Required for a public load balancer (public_subnet_ids set); with it, port 80 only redirects to HTTPS."
  type        = string
  default     = ""
}

variable "gateway_allow_plain_http" {
  description = "Allow an internal load balancer without a certificate to forward plain HTTP on port 80 (bearer keys in clear text inside the VPC). Never allowed for a public load balancer."
  type        = bool
  default     = false
}

variable "gateway_deletion_protection" {
  description = "Deletion protection of the gateway's load balancer (turn off before destroying the deployment)."
  type        = bool
  default     = true
}

variable "gateway_waf_acl_arn" {
  description = "WAFv2 web ACL to associate with the gateway's load balancer (empty: none; recommended for a public one)."
  type        = string
  default     = ""
}

variable "gateway_allowed_cidrs" {
  description = "CIDR blocks allowed to reach the gateway's load balancer."
  type        = list(string)
  default     = ["10.0.0.0/8"]
}

variable "weir_image" {
  description = "Container image of the weir binary (built from the repository's Dockerfile), e.g. <account>.dkr.ecr.<region>.amazonaws.com/weir:<tag>. Empty: the ECR repository this module creates, tag weir_image_tag."
  type        = string
  default     = ""
}

variable "weir_image_tag" {
  description = "Tag of the image in the module's ECR repository when weir_image is empty."
  type        = string
  default     = "latest"
}

variable "kafka_version" {
  description = "MSK Kafka version."
  type        = string
  default     = "3.7.x"
}

variable "kafka_instance_type" {
  description = "MSK broker instance type."
  type        = string
  default     = "kafka.m7g.large"
}

variable "kafka_broker_count" {
  description = "Number of MSK brokers: at least 3 (replication factor 3, min.insync.replicas 2) and a multiple of the number of private subnets (MSK spreads brokers evenly over them)."
  type        = number
  default     = 3

  validation {
    condition     = var.kafka_broker_count >= 3 && floor(var.kafka_broker_count) == var.kafka_broker_count
    error_message = "kafka_broker_count must be a whole number of at least 3 (topics use replication factor 3)."
  }
}

variable "dlq_retention_days" {
  description = "Retention of the dead-letter topic (weir.dlq.v1), days: long enough to look at a letter and redrive it (`weir dlq redrive`). The setup task sets it (kafka.dlq_retention_ms), also on an existing topic; the other topics keep 7 days."
  type        = number
  default     = 30

  validation {
    condition     = var.dlq_retention_days >= 7
    error_message = "dlq_retention_days must be at least 7."
  }
}

variable "kafka_volume_gib" {
  description = "EBS storage per broker, GiB."
  type        = number
  default     = 500
}

variable "kafka_partitions" {
  description = "Partitions per weir topic (bounds how many instances of a processor share the work)."
  type        = number
  default     = 24
}

variable "db_engine_version" {
  description = "RDS PostgreSQL engine version, pinned to a minor (auto minor upgrades are off: the minor decides the pgvector version RDS offers). weir needs PostgreSQL 16 with pgvector >= 0.8.0, which RDS ships from 16.6; `weir doctor` (in the setup task) refuses older ones."
  type        = string
  default     = "16.8"

  validation {
    condition     = can(regex("^16\\.([0-9]+)$", var.db_engine_version)) && try(tonumber(regex("^16\\.([0-9]+)$", var.db_engine_version)[0]) >= 6, false)
    error_message = "db_engine_version must be a pinned PostgreSQL 16 minor, 16.6 or later (pgvector 0.8.0)."
  }
}

variable "db_backup_retention_days" {
  description = "RDS automated backup retention (point-in-time restore window), days. The CAS bucket keeps deleted blobs at least this long, so a restored database finds its blobs."
  type        = number
  default     = 14

  validation {
    condition     = var.db_backup_retention_days >= 7 && var.db_backup_retention_days <= 35
    error_message = "db_backup_retention_days must be between 7 and 35."
  }
}

variable "cas_noncurrent_retention_days" {
  description = "Days the CAS bucket keeps a blob after weir's garbage collector deleted it (noncurrent versions). Must be at least db_backup_retention_days."
  type        = number
  default     = 35
}

variable "db_instance_class" {
  description = "RDS instance class."
  type        = string
  default     = "db.r7g.large"
}

variable "db_allocated_gib" {
  description = "RDS storage, GiB (grows automatically up to 4x)."
  type        = number
  default     = 200
}

variable "db_multi_az" {
  description = "Whether RDS runs a standby in a second availability zone."
  type        = bool
  default     = true
}

variable "db_max_connections" {
  description = "Pool size of each weir process (postgres.max_connections)."
  type        = number
  default     = 10
}

variable "schema_registry_url" {
  description = "URL of an existing Confluent-compatible schema registry. Empty: this module runs Apicurio Registry (Confluent API at /apis/ccompat/v7) on ECS, stored in the RDS database."
  type        = string
  default     = ""
}

variable "apicurio_image" {
  description = "Apicurio Registry image used when schema_registry_url is empty. Empty: apicurio/apicurio-registry:3.0.9 through the module's ECR pull-through cache of quay.io (the tasks reach no registry outside AWS)."
  type        = string
  default     = ""
}

variable "processors" {
  description = "The weir processes to run as ECS services (`weir run <name>`), with size and task counts: desired_count is the autoscaling minimum, max_count its maximum (for a consumer at most kafka_partitions: more tasks than partitions sit idle). backlog_per_task: the consumer-lag target of the lag scaling policy, records per task (default per processor, docs/deploy-aws.md)."
  type = map(object({
    cpu              = number
    memory           = number
    desired_count    = number
    max_count        = number
    backlog_per_task = optional(number)
  }))
  default = {
    materializer = { cpu = 1024, memory = 2048, desired_count = 2, max_count = 8 }
    coordinator  = { cpu = 1024, memory = 2048, desired_count = 2, max_count = 8 }
    cache        = { cpu = 2048, memory = 4096, desired_count = 2, max_count = 8 }
    relay        = { cpu = 512, memory = 1024, desired_count = 2, max_count = 4 }
    gateway      = { cpu = 1024, memory = 2048, desired_count = 2, max_count = 10 }
  }

  validation {
    condition     = alltrue([for k in keys(var.processors) : contains(["materializer", "coordinator", "cache", "relay", "gateway"], k)])
    error_message = "processors keys must be among materializer, coordinator, cache, relay, gateway."
  }
  validation {
    condition     = alltrue([for p in values(var.processors) : p.desired_count >= 1 && p.max_count >= p.desired_count])
    error_message = "each processor needs desired_count >= 1 and max_count >= desired_count."
  }
}

variable "extra_environment" {
  description = "Extra WEIR__SECTION__KEY settings for every weir task (see docs/configuration.md), e.g. the cache embedder."
  type        = map(string)
  default     = {}
}

variable "embedder_api_key_secret_arn" {
  description = "Secrets Manager ARN of the OpenAI-compatible embeddings API key, injected as WEIR__CACHE__OPENAI_API_KEY into the cache and gateway tasks (empty: none; the image's built-in all-MiniLM-L6-v2 is the default embedder)."
  type        = string
  default     = ""
}

variable "log_retention_days" {
  description = "CloudWatch Logs retention (weir, MSK, RDS and load balancer logs), days."
  type        = number
  default     = 365
}

variable "private_route_table_ids" {
  description = "Route tables of the private subnets, for the S3 gateway endpoint (empty with create_vpc_endpoints: the endpoint is not created and S3 must be reachable another way)."
  type        = list(string)
  default     = []
}

variable "create_vpc_endpoints" {
  description = "Create VPC endpoints for S3 (gateway) and the AWS APIs the tasks call (ECR, CloudWatch Logs, Secrets Manager, KMS, ECS, Managed Prometheus), so the tasks need no route to the internet. Off when the VPC already has them."
  type        = bool
  default     = true
}

variable "registry_egress_cidrs" {
  description = "CIDR blocks of an existing schema registry (schema_registry_url), reached on the URL's port."
  type        = list(string)
  default     = []
}

variable "embedder_egress_cidrs" {
  description = "CIDR blocks of the OpenAI-compatible embeddings API (HTTPS, 443), when the cache uses one; empty: the built-in embedder, no egress."
  type        = list(string)
  default     = []
}

variable "alarm_emails" {
  description = "E-mail addresses subscribed to the alarm topic (CloudWatch alarms and the Prometheus alert rules); each must confirm the subscription."
  type        = list(string)
  default     = []
}

variable "collector_image" {
  description = "AWS Distro for OpenTelemetry collector image (scrapes every task's /metrics). Default: through the module's ECR pull-through cache of ECR Public."
  type        = string
  default     = ""
}

variable "aws_cli_image" {
  description = "AWS CLI image used by the API key task to store a new key in Secrets Manager. Default: through the module's ECR pull-through cache of ECR Public."
  type        = string
  default     = ""
}

variable "db_max_server_connections" {
  description = "Postgres max_connections. Must cover every processor at max_count times db_max_connections, plus the registry and the setup task (checked at plan)."
  type        = number
  default     = 1000
}

variable "db_read_replica_count" {
  description = "Read replicas of the database (for reads outside weir and restore drills; weir itself uses only the primary). Each gets a replica lag alarm."
  type        = number
  default     = 0
}

variable "task_runner" {
  description = "Program that runs a one-off ECS task and fails unless it stopped with exit status 0 (empty: terraform/scripts/run-task, which needs the AWS CLI). Only tests replace it."
  type        = string
  default     = ""
}
