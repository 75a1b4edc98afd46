"""The gateway: routes requests to endpoints, checks access, holds them while an endpoint wakes."""
