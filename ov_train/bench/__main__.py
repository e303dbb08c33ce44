from ov_train.cli.bench import main

main()
