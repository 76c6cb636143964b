# Autoscaling. Between desired_count (the minimum) and max_count per service:
# - consumers (materializer, coordinator, cache) track their consumer group's backlog per
#   task: weir's lag gauge (weir_consumer_lag, per partition), published to CloudWatch by the
#   collector (monitoring.tf), averaged over partitions, times the partition count, divided by
#   the running tasks; CPU is the second signal. A consumer never gets more tasks than its
#   input topic has partitions (a precondition): the extra ones would sit idle.
# - the gateway tracks requests per target (the load balancer's count) and CPU.
# - the relay tracks CPU; it scales by outbox lanes (outbox.lanes, 64), never above them.
# Target tracking takes the larger of the policies' wishes, so either signal scales out, and
# scales in only when both allow it. docs/deploy-aws.md ("Autoscaling") gives the reasoning.

locals {
  # Records of backlog per task the lag policy aims at: about 10 s of one task's measured
  # throughput (docs/capacity.md).
  default_backlog_per_task = { materializer = 50000, coordinator = 50000, cache = 10000 }
  # Requests per second per gateway task the request policy aims at (docs/capacity.md).
  default_gateway_requests_per_task = 5000

  lag_scaled = { for k, p in var.processors : k => p if contains(keys(local.consumer_inputs), k) }
}

resource "aws_appautoscaling_target" "processor" {
  for_each           = var.processors
  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.weir.name}/${aws_ecs_service.processor[each.key].name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = each.value.desired_count
  max_capacity       = each.value.max_count

  lifecycle {
    precondition {
      condition     = !contains(keys(local.consumer_inputs), each.key) || each.value.max_count <= var.kafka_partitions
      error_message = "a consumer's max_count must not exceed kafka_partitions: one partition is consumed by one task at a time, more tasks sit idle."
    }
    precondition {
      condition     = each.key != "relay" || each.value.max_count <= 64
      error_message = "the relay's max_count must not exceed its outbox lanes (outbox.lanes, 64): each lane is held by one relay."
    }
  }
}

resource "aws_appautoscaling_policy" "processor_cpu" {
  for_each           = var.processors
  name               = "${local.prefix}-${each.key}-cpu"
  service_namespace  = "ecs"
  resource_id        = aws_appautoscaling_target.processor[each.key].resource_id
  scalable_dimension = aws_appautoscaling_target.processor[each.key].scalable_dimension
  policy_type        = "TargetTrackingScaling"

  target_tracking_scaling_policy_configuration {
    target_value       = 60
    scale_in_cooldown  = 300
    scale_out_cooldown = 60
    predefined_metric_specification {
      predefined_metric_type = "ECSServiceAverageCPUUtilization"
    }
  }
}

resource "aws_appautoscaling_policy" "consumer_lag" {
  for_each           = local.lag_scaled
  name               = "${local.prefix}-${each.key}-lag"
  service_namespace  = "ecs"
  resource_id        = aws_appautoscaling_target.processor[each.key].resource_id
  scalable_dimension = aws_appautoscaling_target.processor[each.key].scalable_dimension
  policy_type        = "TargetTrackingScaling"

  target_tracking_scaling_policy_configuration {
    target_value       = coalesce(each.value.backlog_per_task, local.default_backlog_per_task[each.key])
    scale_in_cooldown  = 300
    scale_out_cooldown = 60

    customized_metric_specification {
      metrics {
        id          = "lag"
        label       = "average records behind per partition"
        return_data = false
        metric_stat {
          stat = "Average"
          metric {
            namespace   = local.metrics_namespace
            metric_name = "weir_consumer_lag"
            dimensions {
              name  = "group"
              value = local.consumer_groups[each.key]
            }
          }
        }
      }
      metrics {
        id          = "tasks"
        label       = "running tasks"
        return_data = false
        metric_stat {
          stat = "Average"
          metric {
            namespace   = "ECS/ContainerInsights"
            metric_name = "RunningTaskCount"
            dimensions {
              name  = "ClusterName"
              value = aws_ecs_cluster.weir.name
            }
            dimensions {
              name  = "ServiceName"
              value = aws_ecs_service.processor[each.key].name
            }
          }
        }
      }
      metrics {
        id          = "backlog_per_task"
        label       = "records behind per running task"
        expression  = "IF(tasks > 0, lag * ${var.kafka_partitions} / tasks, lag * ${var.kafka_partitions})"
        return_data = true
      }
    }
  }
}

resource "aws_appautoscaling_policy" "gateway_requests" {
  for_each           = contains(keys(var.processors), "gateway") ? { gateway = var.processors["gateway"] } : {}
  name               = "${local.prefix}-gateway-requests"
  service_namespace  = "ecs"
  resource_id        = aws_appautoscaling_target.processor["gateway"].resource_id
  scalable_dimension = aws_appautoscaling_target.processor["gateway"].scalable_dimension
  policy_type        = "TargetTrackingScaling"

  target_tracking_scaling_policy_configuration {
    # ALBRequestCountPerTarget is a count per minute.
    target_value       = coalesce(each.value.backlog_per_task, local.default_gateway_requests_per_task) * 60
    scale_in_cooldown  = 300
    scale_out_cooldown = 60
    predefined_metric_specification {
      predefined_metric_type = "ALBRequestCountPerTarget"
      resource_label         = "${aws_lb.gateway.arn_suffix}/${aws_lb_target_group.gateway.arn_suffix}"
    }
  }
}
