"""The JVM-aware memory balloon: guest agent sources, agent build, host agent."""
