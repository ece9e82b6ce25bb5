"""Load harness: Locust users and scenarios, the headless concurrency sweep, its report and plots."""
