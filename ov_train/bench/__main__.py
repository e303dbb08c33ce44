from ov_train.bench import main

main()
