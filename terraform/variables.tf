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
  description = "ACM certificate for the gateway's HTTPS listener (empty: plain HTTP on port 80, for private use only)."
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
  description = "Number of MSK brokers (a multiple of the number of private subnets)."
  type        = number
  default     = 3
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
  description = "Apicurio Registry image used when schema_registry_url is empty."
  type        = string
  default     = "quay.io/apicurio/apicurio-registry:3.0.9"
}

variable "processors" {
  description = "The weir processes to run as ECS services (`weir run <name>`), with size and count. Consumers scale up to the topic's partition count."
  type = map(object({
    cpu           = number
    memory        = number
    desired_count = number
    max_count     = number
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
  description = "CloudWatch Logs retention."
  type        = number
  default     = 30
}
