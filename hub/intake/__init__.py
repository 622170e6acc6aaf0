"""Monitoring intake: the NSCA wire protocol, check results, the Nagios command file."""
