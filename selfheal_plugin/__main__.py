from selfheal_plugin.cli.main import main_self_heal

main_self_heal()
