"""Search: importance of segments, the two-stage DP solver, plans, and the measured closed loop."""
