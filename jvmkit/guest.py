"""The guest's side of the contract, the same for every target: where things are inside an image,
how the guest agent is started, and the per-run seed the host hands the guest.

Pack time writes these paths into images; run time relies on them (the JMX port the balloon
forwards, the seed's keys). A target may deliver the seed its own way (linux: fw_cfg, OSv: a
small raw disk), but what the agent reads is always `seed_text()`.
"""

from __future__ import annotations

GUEST_RUNTIME = "/jvm"                 # the trimmed runtime: /jvm/bin/java
GUEST_APP = "/app"                     # the app's jar and its class-path jars
GUEST_AGENT = "/jvmkit/agent.jar"      # the guest agent, the Launcher and the Shrinker API
GUEST_SEED = "/run/jvmkit/seed"        # where the guest finds the per-run seed (a target may override)
SEED_PROPERTY = "-Djvmkit.seed="
JMX_GUEST_PORT = 7091                  # the guest agent's JMX connector (forwarded from a loopback host port)
JMX_USER = "jvmkit"


def agent_flags(seed_path: str = GUEST_SEED) -> tuple[str, ...]:
    """The JVM flags that start the guest agent (only for runs that ask for it: `run --balloon`)."""
    return (SEED_PROPERTY + seed_path, f"-javaagent:{GUEST_AGENT}")


AGENT_FLAGS = agent_flags()


def seed_text(*, jmx_host_port: int, user: str, password: str, jmx_guest_port: int = JMX_GUEST_PORT,
              advertise_host: str = "127.0.0.1") -> str:
    """The seed file's `key=value` lines (pure): the agent's JMX port in the guest, the address a
    host client uses, and this run's credentials."""
    return (f"jmx.port={jmx_guest_port}\njmx.advertise={advertise_host}:{jmx_host_port}\n"
            f"jmx.user={user}\njmx.password={password}\n")
