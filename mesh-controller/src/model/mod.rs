//! The node-facing model, built from the configuration in force.
