# Monitoring. An AWS Distro for OpenTelemetry collector (one ECS service) finds every weir
# task through the ECS API and scrapes its /metrics on the telemetry port (job `weir`, as the
# alert rules expect), writes everything to Amazon Managed Service for Prometheus (AMP) and the
# backlog gauges to CloudWatch (the lag autoscaling policies read them). AMP evaluates the
# project's alert rules, loaded unchanged from infra/observability/rules/weir.rules.yml (one
# source of truth), and its alert manager notifies the alarm SNS topic. CloudWatch alarms
# watch RDS and MSK and notify the same topic. The Grafana dashboard
# (infra/observability/grafana/weir.json) imports into any Grafana with AMP as a Prometheus
# data source (docs/deploy-aws.md, "Monitoring").

locals {
  rules_file        = "${path.module}/../infra/observability/rules/weir.rules.yml"
  metrics_namespace = "weir/${local.prefix}"
  scrape_interval   = "15s"

  collector_config = yamlencode({
    extensions = {
      sigv4auth = { region = var.region, service = "aps" }
      ecs_observer = {
        cluster_name     = aws_ecs_cluster.weir.name
        cluster_region   = var.region
        refresh_interval = "30s"
        result_file      = "/etc/ecs_sd_targets.yaml"
        services = [{
          name_pattern  = "^(materializer|coordinator|cache|relay|gateway)$"
          metrics_ports = [local.metrics_port]
          metrics_path  = "/metrics"
          job_name      = "weir"
        }]
      }
    }
    receivers = {
      prometheus = {
        config = {
          scrape_configs = [{
            job_name        = "weir"
            scrape_interval = local.scrape_interval
            scrape_timeout  = "10s"
            file_sd_configs = [{ files = ["/etc/ecs_sd_targets.yaml"], refresh_interval = "30s" }]
          }]
        }
      }
    }
    processors = {
      batch = {}
      # Only the backlog gauges go to CloudWatch (billed per metric); everything goes to AMP.
      "filter/backlog" = {
        metrics = { include = { match_type = "strict", metric_names = ["weir_consumer_lag"] } }
      }
    }
    exporters = {
      prometheusremotewrite = {
        endpoint = "${aws_prometheus_workspace.weir.prometheus_endpoint}api/v1/remote_write"
        auth     = { authenticator = "sigv4auth" }
      }
      awsemf = {
        namespace               = local.metrics_namespace
        log_group_name          = aws_cloudwatch_log_group.metrics.name
        region                  = var.region
        dimension_rollup_option = "NoDimensionRollup"
        metric_declarations     = [{ dimensions = [["group"]], metric_name_selectors = ["^weir_consumer_lag$"] }]
      }
    }
    service = {
      extensions = ["sigv4auth", "ecs_observer"]
      pipelines = {
        "metrics/amp"     = { receivers = ["prometheus"], processors = ["batch"], exporters = ["prometheusremotewrite"] }
        "metrics/backlog" = { receivers = ["prometheus"], processors = ["filter/backlog", "batch"], exporters = ["awsemf"] }
      }
    }
  })
}

resource "aws_prometheus_workspace" "weir" {
  alias       = local.prefix
  kms_key_arn = aws_kms_key.weir.arn
}

resource "aws_prometheus_rule_group_namespace" "weir" {
  name         = "weir"
  workspace_id = aws_prometheus_workspace.weir.id
  data         = file(local.rules_file)
}

resource "aws_prometheus_alert_manager_definition" "weir" {
  workspace_id = aws_prometheus_workspace.weir.id
  definition   = <<-YAML
    alertmanager_config: |
      route:
        receiver: sns
        group_by: [alertname]
        group_wait: 30s
        group_interval: 5m
        repeat_interval: 4h
      receivers:
        - name: sns
          sns_configs:
            - topic_arn: ${aws_sns_topic.alarms.arn}
              sigv4:
                region: ${var.region}
              subject: '[weir ${local.prefix}] {{ .CommonLabels.alertname }} ({{ .Status }})'
              attributes:
                severity: '{{ .CommonLabels.severity }}'
  YAML
}

resource "aws_sns_topic" "alarms" {
  name              = "${local.prefix}-alarms"
  kms_master_key_id = aws_kms_key.weir.arn
}

data "aws_iam_policy_document" "alarms" {
  statement {
    sid       = "AlarmPublishers"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms.arn]
    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com", "aps.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_sns_topic_policy" "alarms" {
  arn    = aws_sns_topic.alarms.arn
  policy = data.aws_iam_policy_document.alarms.json
}

resource "aws_sns_topic_subscription" "alarm_email" {
  for_each  = toset(var.alarm_emails)
  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = each.value
}

# The backlog gauges in CloudWatch embedded metric format (read by the lag policies).
resource "aws_cloudwatch_log_group" "metrics" {
  name              = "/${local.prefix}/metrics"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.weir.arn
}

resource "aws_ecs_task_definition" "collector" {
  family                   = "${local.prefix}-collector"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 512
  memory                   = 1024
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.collector.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  container_definitions = jsonencode([{
    name      = "collector"
    image     = local.collector_image
    essential = true
    # ecs_observer writes its target file under /etc; nothing else is written.
    readonlyRootFilesystem = false
    environment = [
      { name = "AOT_CONFIG_CONTENT", value = local.collector_config },
      { name = "AWS_REGION", value = var.region },
    ]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.weir.name
        awslogs-region        = var.region
        awslogs-stream-prefix = "collector"
      }
    }
  }])
  # checkov:skip=CKV_AWS_336: the ECS observer writes its discovered targets to a file in the container
}

# One collector: two would scrape every task twice and write duplicate samples. ECS replaces
# it when it stops; meanwhile the CPU policies still scale and the CloudWatch alarms still fire.
resource "aws_ecs_service" "collector" {
  name            = "collector"
  cluster         = aws_ecs_cluster.weir.id
  task_definition = aws_ecs_task_definition.collector.arn
  desired_count   = 1
  launch_type     = "FARGATE"

  network_configuration {
    subnets          = var.private_subnet_ids
    security_groups  = [aws_security_group.collector.id]
    assign_public_ip = false
  }
}

# --- CloudWatch alarms: RDS and MSK ------------------------------------------------------------

locals {
  alarm_actions = [aws_sns_topic.alarms.arn]
  db_alarms = {
    cpu = {
      metric = "CPUUtilization", stat = "Average", op = "GreaterThanThreshold", threshold = 80
      what   = "RDS CPU above 80 % for 15 minutes: weir's batches queue behind the database (docs/capacity.md)"
    }
    free_storage = {
      metric = "FreeStorageSpace", stat = "Minimum", op = "LessThanThreshold", threshold = var.db_allocated_gib * 0.1 * 1073741824
      what   = "RDS free storage below 10 % of the allocated size (autoscaling storage may be at its maximum)"
    }
    connections = {
      metric = "DatabaseConnections", stat = "Maximum", op = "GreaterThanThreshold", threshold = floor(var.db_max_server_connections * 0.8)
      what   = "RDS connections above 80 % of max_connections"
    }
  }
}

resource "aws_cloudwatch_metric_alarm" "db" {
  for_each            = local.db_alarms
  alarm_name          = "${local.prefix}-rds-${each.key}"
  alarm_description   = each.value.what
  namespace           = "AWS/RDS"
  metric_name         = each.value.metric
  statistic           = each.value.stat
  comparison_operator = each.value.op
  threshold           = each.value.threshold
  period              = 300
  evaluation_periods  = 3
  treat_missing_data  = "breaching"
  dimensions          = { DBInstanceIdentifier = aws_db_instance.weir.identifier }
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "db_replica_lag" {
  count               = var.db_read_replica_count
  alarm_name          = "${local.prefix}-rds-replica-${count.index}-lag"
  alarm_description   = "Read replica more than 60 s behind the primary"
  namespace           = "AWS/RDS"
  metric_name         = "ReplicaLag"
  statistic           = "Maximum"
  comparison_operator = "GreaterThanThreshold"
  threshold           = 60
  period              = 60
  evaluation_periods  = 5
  treat_missing_data  = "breaching"
  dimensions          = { DBInstanceIdentifier = aws_db_instance.replica[count.index].identifier }
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "msk_disk" {
  count               = var.kafka_broker_count
  alarm_name          = "${local.prefix}-msk-broker-${count.index + 1}-disk"
  alarm_description   = "MSK broker ${count.index + 1} data disk above 80 % (raise kafka_volume_gib or lower retention)"
  namespace           = "AWS/Kafka"
  metric_name         = "KafkaDataLogsDiskUsed"
  statistic           = "Maximum"
  comparison_operator = "GreaterThanThreshold"
  threshold           = 80
  period              = 300
  evaluation_periods  = 2
  treat_missing_data  = "breaching"
  dimensions          = { "Cluster Name" = aws_msk_cluster.weir.cluster_name, "Broker ID" = tostring(count.index + 1) }
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "msk_under_replicated" {
  count               = var.kafka_broker_count
  alarm_name          = "${local.prefix}-msk-broker-${count.index + 1}-under-replicated"
  alarm_description   = "MSK broker ${count.index + 1} leads under-replicated partitions: acks=all writes run on fewer replicas"
  namespace           = "AWS/Kafka"
  metric_name         = "UnderReplicatedPartitions"
  statistic           = "Maximum"
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  period              = 60
  evaluation_periods  = 10
  treat_missing_data  = "breaching"
  dimensions          = { "Cluster Name" = aws_msk_cluster.weir.cluster_name, "Broker ID" = tostring(count.index + 1) }
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}

resource "aws_cloudwatch_metric_alarm" "msk_offline_partitions" {
  alarm_name          = "${local.prefix}-msk-offline-partitions"
  alarm_description   = "MSK has partitions without a leader: their producers and consumers stop"
  namespace           = "AWS/Kafka"
  metric_name         = "OfflinePartitionsCount"
  statistic           = "Maximum"
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  period              = 60
  evaluation_periods  = 2
  treat_missing_data  = "breaching"
  dimensions          = { "Cluster Name" = aws_msk_cluster.weir.cluster_name }
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
}
