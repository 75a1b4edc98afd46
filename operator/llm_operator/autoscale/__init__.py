"""The autoscaler: gateway request metrics -> Deployment replicas."""
