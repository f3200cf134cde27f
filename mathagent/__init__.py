"""mathagent: multi-turn tool-integrated preference learning for math agents (Xiong et al., 2024)."""

__version__ = "0.1.0"
