# Security groups: tasks reach MSK, RDS and the registry; the load balancer reaches the gateway.

resource "aws_security_group" "tasks" {
  name        = "${local.prefix}-tasks"
  description = "weir processes and the schema registry"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_egress_rule" "tasks_all" {
  security_group_id = aws_security_group.tasks.id
  description       = "AWS APIs (S3, ECR, Secrets Manager, logs) and the VPC services"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
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

resource "aws_vpc_security_group_ingress_rule" "lb_clients" {
  for_each          = toset(var.gateway_allowed_cidrs)
  security_group_id = aws_security_group.lb.id
  description       = "gateway clients"
  ip_protocol       = "tcp"
  from_port         = var.gateway_certificate_arn != "" ? 443 : 80
  to_port           = var.gateway_certificate_arn != "" ? 443 : 80
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_egress_rule" "lb_to_tasks" {
  security_group_id            = aws_security_group.lb.id
  description                  = "to the gateway tasks"
  ip_protocol                  = "tcp"
  from_port                    = local.gateway_port
  to_port                      = local.gateway_port
  referenced_security_group_id = aws_security_group.tasks.id
}
