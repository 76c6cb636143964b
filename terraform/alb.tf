# The gateway's load balancer. HTTPS with a certificate, port 80 only redirecting to it; a
# public load balancer without a certificate is refused (bearer keys would cross the internet
# in clear text). Only the gateway's API paths are forwarded: /metrics (tenant ids in its
# labels) is served on the telemetry port, which the load balancer never reaches, and any
# other path gets a fixed 404 from the load balancer itself. Access logs go to S3.

resource "aws_lb" "gateway" {
  # checkov:skip=CKV2_AWS_28: a WAF web ACL is the operator's choice (gateway_waf_acl_arn associates one); the gateway authenticates every request and rate-limits per key and per client
  # checkov:skip=CKV2_AWS_76: same: the web ACL and its rule groups are the operator's (gateway_waf_acl_arn)
  # checkov:skip=CKV2_AWS_20: with a certificate port 80 is aws_lb_listener.gateway_redirect (redirect only, checked by terraform/tests); checkov does not follow the counted listener
  name                       = "${local.prefix}-gateway"
  load_balancer_type         = "application"
  internal                   = !local.public_gateway
  subnets                    = local.public_gateway ? var.public_subnet_ids : var.private_subnet_ids
  security_groups            = [aws_security_group.lb.id]
  idle_timeout               = 60
  drop_invalid_header_fields = true
  enable_deletion_protection = var.gateway_deletion_protection

  access_logs {
    bucket  = aws_s3_bucket.lb_logs.id
    prefix  = "gateway"
    enabled = true
  }

  lifecycle {
    precondition {
      condition     = !local.public_gateway || local.gateway_https
      error_message = "a public gateway load balancer (public_subnet_ids set) needs gateway_certificate_arn: API keys must not cross the internet over plain HTTP."
    }
    precondition {
      condition     = local.gateway_https || var.gateway_allow_plain_http
      error_message = "the gateway load balancer needs gateway_certificate_arn (HTTPS), or, for an internal one only, gateway_allow_plain_http = true."
    }
  }

  depends_on = [module.lb_logs_bucket]
}

resource "aws_wafv2_web_acl_association" "gateway" {
  count        = var.gateway_waf_acl_arn != "" ? 1 : 0
  resource_arn = aws_lb.gateway.arn
  web_acl_arn  = var.gateway_waf_acl_arn
}

resource "aws_lb_target_group" "gateway" {
  # checkov:skip=CKV_AWS_378: TLS ends at the load balancer; the hop to the gateway task stays inside the VPC, in the tasks' security group
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

locals {
  # The gateway's API (docs/api.md) and its probes; everything else is answered by the load
  # balancer with 404 and never reaches a task.
  gateway_paths = ["/v1/*", "/healthz", "/readyz", "/openapi.json"]
  # The listener that serves the API: HTTPS, or plain HTTP only when explicitly allowed.
  api_listener_arn = local.gateway_https ? aws_lb_listener.gateway_https[0].arn : aws_lb_listener.gateway_http[0].arn
}

resource "aws_lb_listener" "gateway_https" {
  count             = local.gateway_https ? 1 : 0
  load_balancer_arn = aws_lb.gateway.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.gateway_certificate_arn

  default_action {
    type = "fixed-response"
    fixed_response {
      content_type = "application/json"
      message_body = "{\"error\":\"not found\"}"
      status_code  = "404"
    }
  }
}

# With a certificate: only a redirect to HTTPS, never a forward.
resource "aws_lb_listener" "gateway_redirect" {
  count             = local.gateway_https ? 1 : 0
  load_balancer_arn = aws_lb.gateway.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "redirect"
    redirect {
      port        = "443"
      protocol    = "HTTPS"
      status_code = "HTTP_301"
    }
  }
}

# Without a certificate (internal only, gateway_allow_plain_http): the API on plain HTTP.
resource "aws_lb_listener" "gateway_http" {
  # checkov:skip=CKV_AWS_2: only created for an internal load balancer with gateway_allow_plain_http set explicitly; a public one is refused without a certificate (precondition on aws_lb.gateway)
  # checkov:skip=CKV_AWS_103: same: plain HTTP by explicit choice on an internal load balancer
  count             = local.gateway_https ? 0 : 1
  load_balancer_arn = aws_lb.gateway.arn
  port              = 80
  protocol          = "HTTP"

  default_action {
    type = "fixed-response"
    fixed_response {
      content_type = "application/json"
      message_body = "{\"error\":\"not found\"}"
      status_code  = "404"
    }
  }
}

resource "aws_lb_listener_rule" "gateway_api" {
  listener_arn = local.api_listener_arn
  priority     = 10

  condition {
    path_pattern {
      values = local.gateway_paths
    }
  }

  action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.gateway.arn
  }
}
