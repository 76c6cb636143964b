# Security groups: tasks reach MSK, RDS, the registry, the AWS APIs (through VPC endpoints)
# and, when configured, an external registry and the embeddings API: nothing else. The load
# balancer reaches the gateway's API port only; the collector reaches the telemetry port.

resource "aws_security_group" "tasks" {
  name        = "${local.prefix}-tasks"
  description = "weir processes and the schema registry"
  vpc_id      = var.vpc_id
}

locals {
  registry_port = try(tonumber(regex("^https?://[^/:]+:([0-9]+)", var.schema_registry_url)[0]), startswith(var.schema_registry_url, "https") ? 443 : 80)
  # Every way out of the tasks' security group, by name.
  task_egress = merge(
    {
      kafka    = { port = 9096, sg = aws_security_group.msk.id, cidr = null, pl = null, what = "MSK brokers (SASL/SCRAM over TLS)" }
      postgres = { port = 5432, sg = aws_security_group.db.id, cidr = null, pl = null, what = "RDS PostgreSQL" }
    },
    local.run_registry ? {
      registry = { port = 8080, sg = aws_security_group.tasks.id, cidr = null, pl = null, what = "the schema registry tasks" }
    } : {},
    var.create_vpc_endpoints ? {
      aws_apis = { port = 443, sg = aws_security_group.endpoints[0].id, cidr = null, pl = null, what = "AWS APIs through the interface VPC endpoints" }
      s3       = { port = 443, sg = null, cidr = null, pl = aws_vpc_endpoint.s3[0].prefix_list_id, what = "S3 through the gateway VPC endpoint (CAS, ECR image layers)" }
      } : {
      aws_apis = { port = 443, sg = null, cidr = "0.0.0.0/0", pl = null, what = "AWS APIs and S3 through the VPC's own route (create_vpc_endpoints = false)" }
    },
    { for i, c in(local.run_registry ? [] : var.registry_egress_cidrs) : "registry_${i}" => { port = local.registry_port, sg = null, cidr = c, pl = null, what = "the external schema registry" } },
    { for i, c in var.embedder_egress_cidrs : "embedder_${i}" => { port = 443, sg = null, cidr = c, pl = null, what = "the embeddings API" } },
  )
}

resource "aws_vpc_security_group_egress_rule" "tasks" {
  for_each                     = local.task_egress
  security_group_id            = aws_security_group.tasks.id
  description                  = each.value.what
  ip_protocol                  = "tcp"
  from_port                    = each.value.port
  to_port                      = each.value.port
  referenced_security_group_id = each.value.sg
  cidr_ipv4                    = each.value.cidr
  prefix_list_id               = each.value.pl
}

resource "aws_vpc_security_group_ingress_rule" "tasks_metrics" {
  security_group_id            = aws_security_group.tasks.id
  description                  = "telemetry port (/metrics) from the collector"
  ip_protocol                  = "tcp"
  from_port                    = local.metrics_port
  to_port                      = local.metrics_port
  referenced_security_group_id = aws_security_group.collector.id
}

resource "aws_security_group" "collector" {
  name        = "${local.prefix}-collector"
  description = "the metrics collector"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_egress_rule" "collector_scrape" {
  security_group_id            = aws_security_group.collector.id
  description                  = "scrape the weir tasks' /metrics"
  ip_protocol                  = "tcp"
  from_port                    = local.metrics_port
  to_port                      = local.metrics_port
  referenced_security_group_id = aws_security_group.tasks.id
}

resource "aws_vpc_security_group_egress_rule" "collector_apis" {
  security_group_id            = aws_security_group.collector.id
  description                  = "ECS, Managed Prometheus and CloudWatch Logs APIs"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = var.create_vpc_endpoints ? aws_security_group.endpoints[0].id : null
  cidr_ipv4                    = var.create_vpc_endpoints ? null : "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "collector_s3" {
  count             = var.create_vpc_endpoints ? 1 : 0
  security_group_id = aws_security_group.collector.id
  description       = "ECR image layers from S3 through the gateway endpoint"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  prefix_list_id    = aws_vpc_endpoint.s3[0].prefix_list_id
}

resource "aws_vpc_security_group_ingress_rule" "tasks_registry" {
  security_group_id            = aws_security_group.tasks.id
  description                  = "schema registry from weir tasks"
  ip_protocol                  = "tcp"
  from_port                    = 8080
  to_port                      = 8080
  referenced_security_group_id = aws_security_group.tasks.id
}

resource "aws_vpc_security_group_ingress_rule" "tasks_from_lb" {
  security_group_id            = aws_security_group.tasks.id
  description                  = "gateway from its load balancer"
  ip_protocol                  = "tcp"
  from_port                    = local.gateway_port
  to_port                      = local.gateway_port
  referenced_security_group_id = aws_security_group.lb.id
}

resource "aws_security_group" "msk" {
  name        = "${local.prefix}-msk"
  description = "MSK brokers"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "msk_scram" {
  security_group_id            = aws_security_group.msk.id
  description                  = "SASL/SCRAM over TLS from weir tasks"
  ip_protocol                  = "tcp"
  from_port                    = 9096
  to_port                      = 9096
  referenced_security_group_id = aws_security_group.tasks.id
}

resource "aws_security_group" "db" {
  name        = "${local.prefix}-db"
  description = "RDS PostgreSQL"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "db_tasks" {
  security_group_id            = aws_security_group.db.id
  description                  = "Postgres from weir tasks"
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
  referenced_security_group_id = aws_security_group.tasks.id
}

resource "aws_security_group" "lb" {
  name        = "${local.prefix}-gateway-lb"
  description = "Load balancer of the weir gateway"
  vpc_id      = var.vpc_id
}

# HTTPS, and port 80 (which then only redirects to HTTPS); port 80 alone without a certificate.
resource "aws_vpc_security_group_ingress_rule" "lb_clients" {
  for_each = { for pair in setproduct(var.gateway_allowed_cidrs, local.gateway_https ? [443, 80] : [80]) : "${pair[0]}:${pair[1]}" => pair }
  # checkov:skip=CKV_AWS_260: port 80 only answers with a redirect to HTTPS when a certificate is set; without one the load balancer must be internal (precondition on aws_lb.gateway)
  security_group_id = aws_security_group.lb.id
  description       = "gateway clients"
  ip_protocol       = "tcp"
  from_port         = each.value[1]
  to_port           = each.value[1]
  cidr_ipv4         = each.value[0]
}

resource "aws_vpc_security_group_egress_rule" "lb_to_tasks" {
  security_group_id            = aws_security_group.lb.id
  description                  = "to the gateway tasks"
  ip_protocol                  = "tcp"
  from_port                    = local.gateway_port
  to_port                      = local.gateway_port
  referenced_security_group_id = aws_security_group.tasks.id
}

# --- VPC endpoints: S3 (gateway) and the AWS APIs the tasks call (interface) ------------------

locals {
  interface_endpoints = ["ecr.api", "ecr.dkr", "logs", "secretsmanager", "kms", "ecs", "aps-workspaces"]
}

resource "aws_security_group" "endpoints" {
  count       = var.create_vpc_endpoints ? 1 : 0
  name        = "${local.prefix}-endpoints"
  description = "interface VPC endpoints of the AWS APIs"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "endpoints" {
  for_each                     = var.create_vpc_endpoints ? { tasks = aws_security_group.tasks.id, collector = aws_security_group.collector.id } : {}
  security_group_id            = aws_security_group.endpoints[0].id
  description                  = "HTTPS from the ${each.key}"
  ip_protocol                  = "tcp"
  from_port                    = 443
  to_port                      = 443
  referenced_security_group_id = each.value
}

resource "aws_vpc_endpoint" "interface" {
  for_each            = var.create_vpc_endpoints ? toset(local.interface_endpoints) : toset([])
  vpc_id              = var.vpc_id
  service_name        = "com.amazonaws.${var.region}.${each.key}"
  vpc_endpoint_type   = "Interface"
  subnet_ids          = var.private_subnet_ids
  security_group_ids  = [aws_security_group.endpoints[0].id]
  private_dns_enabled = true
}

resource "aws_vpc_endpoint" "s3" {
  count             = var.create_vpc_endpoints ? 1 : 0
  vpc_id            = var.vpc_id
  service_name      = "com.amazonaws.${var.region}.s3"
  vpc_endpoint_type = "Gateway"
  route_table_ids   = var.private_route_table_ids

  lifecycle {
    precondition {
      condition     = length(var.private_route_table_ids) > 0
      error_message = "create_vpc_endpoints needs private_route_table_ids (the S3 gateway endpoint is a route in them)."
    }
  }
}
