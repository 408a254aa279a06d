from lm_opt.cli import main

main()
