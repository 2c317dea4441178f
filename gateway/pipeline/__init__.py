"""The edge path every proxied request takes: route -> authenticate -> authorize -> identity -> proxy."""
