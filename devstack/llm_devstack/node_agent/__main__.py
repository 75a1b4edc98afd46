"""`python -m llm_devstack.node_agent --kubeconfig=... --node=... --workdir=...`: the local node agent."""

import sys

from llm_devstack.node_agent.agent import main

sys.exit(main())
