"""Resilience: preemption, hang watchdog, loss guard, restarts, the goodput ledger and fault injection."""
