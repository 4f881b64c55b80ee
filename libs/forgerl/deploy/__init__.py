"""Checks of a deployed ForgeRL, shared by the chart's `helm test` pods and the end-to-end suite."""
