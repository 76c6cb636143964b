# Kafka: MSK with SASL/SCRAM over TLS (librdkafka speaks it natively; MSK IAM auth would need a
# token callback). Topics are created by `weir topics create` in the setup task, with
# replication factor 3 and min.insync.replicas 2 so acks=all survives one broker.

resource "aws_msk_configuration" "weir" {
  name           = "${local.prefix}-kafka"
  kafka_versions = [var.kafka_version]

  server_properties = <<-PROPS
    auto.create.topics.enable=false
    default.replication.factor=3
    min.insync.replicas=2
    unclean.leader.election.enable=false
    num.partitions=${var.kafka_partitions}
    log.retention.hours=168
    transaction.state.log.replication.factor=3
    transaction.state.log.min.isr=2
  PROPS
}

resource "aws_msk_cluster" "weir" {
  cluster_name           = local.prefix
  kafka_version          = var.kafka_version
  number_of_broker_nodes = var.kafka_broker_count

  broker_node_group_info {
    instance_type   = var.kafka_instance_type
    client_subnets  = var.private_subnet_ids
    security_groups = [aws_security_group.msk.id]

    storage_info {
      ebs_storage_info {
        volume_size = var.kafka_volume_gib
      }
    }
  }

  lifecycle {
    precondition {
      condition     = var.kafka_broker_count % length(var.private_subnet_ids) == 0
      error_message = "kafka_broker_count must be a multiple of the number of private subnets (MSK places the same number of brokers in each)."
    }
  }

  configuration_info {
    arn      = aws_msk_configuration.weir.arn
    revision = aws_msk_configuration.weir.latest_revision
  }

  client_authentication {
    sasl {
      scram = true
    }
  }

  encryption_info {
    encryption_at_rest_kms_key_arn = aws_kms_key.weir.arn
    encryption_in_transit {
      client_broker = "TLS"
      in_cluster    = true
    }
  }

  open_monitoring {
    prometheus {
      jmx_exporter {
        enabled_in_broker = true
      }
      node_exporter {
        enabled_in_broker = true
      }
    }
  }

  logging_info {
    broker_logs {
      cloudwatch_logs {
        enabled   = true
        log_group = aws_cloudwatch_log_group.msk.name
      }
    }
  }
}

resource "aws_cloudwatch_log_group" "msk" {
  name              = "/${local.prefix}/msk"
  retention_in_days = var.log_retention_days
  kms_key_id        = aws_kms_key.weir.arn
}

# MSK requires SCRAM secrets to be named AmazonMSK_* and encrypted with a customer key.
data "aws_secretsmanager_random_password" "kafka" {
  password_length     = 40
  exclude_punctuation = true
}

resource "aws_secretsmanager_secret" "kafka" {
  # checkov:skip=CKV2_AWS_57: MSK reads SCRAM secrets only when associated; rotation is the documented procedure (docs/deploy-aws.md, "Secret rotation"), not a Lambda rotator
  name       = "AmazonMSK_${local.prefix}"
  kms_key_id = aws_kms_key.weir.arn
}

resource "aws_secretsmanager_secret_version" "kafka" {
  secret_id     = aws_secretsmanager_secret.kafka.id
  secret_string = jsonencode({ username = "weir", password = data.aws_secretsmanager_random_password.kafka.random_password })

  # The generator gives a new value on every read; the first one is kept.
  lifecycle {
    ignore_changes = [secret_string]
  }
}

resource "aws_msk_scram_secret_association" "weir" {
  cluster_arn     = aws_msk_cluster.weir.arn
  secret_arn_list = [aws_secretsmanager_secret.kafka.arn]
  depends_on      = [aws_secretsmanager_secret_version.kafka]
}
