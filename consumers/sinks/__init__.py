"""Sinks: services that write the pipeline's canonical login records into stores."""
