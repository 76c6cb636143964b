# The gateway's load balancer: HTTPS when a certificate is given, health-checked on /readyz.

resource "aws_lb" "gateway" {
  name                       = "${local.prefix}-gateway"
  load_balancer_type         = "application"
  internal                   = length(var.public_subnet_ids) == 0
  subnets                    = length(var.public_subnet_ids) > 0 ? var.public_subnet_ids : var.private_subnet_ids
  security_groups            = [aws_security_group.lb.id]
  idle_timeout               = 60
  drop_invalid_header_fields = true
}

resource "aws_lb_target_group" "gateway" {
  name                 = "${local.prefix}-gateway"
  port                 = local.gateway_port
  protocol             = "HTTP"
  target_type          = "ip"
  vpc_id               = var.vpc_id
  deregistration_delay = 30

  health_check {
    path                = "/readyz"
    matcher             = "200"
    interval            = 10
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
}

resource "aws_lb_listener" "gateway_https" {
  count             = var.gateway_certificate_arn != "" ? 1 : 0
  load_balancer_arn = aws_lb.gateway.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.gateway_certificate_arn

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.gateway.arn
  }
}

resource "aws_lb_listener" "gateway_http" {
  count             = var.gateway_certificate_arn == "" ? 1 : 0
  load_balancer_arn = aws_lb.gateway.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.gateway.arn
  }
}
