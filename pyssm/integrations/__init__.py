"""Integrations that swap pyssm's ops into other code: official VMamba (``vmamba``) and
mamba_ssm (``mamba_ssm``) call signatures."""
