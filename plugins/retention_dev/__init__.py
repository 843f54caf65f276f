"""Development package: provider stand-ins, simulated readers, the sample-shop generator,
the demo and sample readers. The product (`retention`) never imports it."""
