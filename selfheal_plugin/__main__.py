from .cli import main_self_heal

main_self_heal()
