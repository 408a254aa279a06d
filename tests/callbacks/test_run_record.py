from lm_opt.callbacks.run_record import describe_error


def raised(make):
    try:
        make()
    except BaseException as exc:
        return exc


def test_an_error_reported_under_a_wrapper_is_named_first_with_the_wrapper_after_it():
    def full_disk():
        try:
            raise OSError(28, "No space left on device")
        except OSError as exc:  # as lightning.fabric.loggers.TensorBoardLogger.log_metrics words any failure
            raise ValueError("\n you tried to log 0.0045 which is currently not supported.") from exc

    assert describe_error(raised(full_disk)) == (
        "OSError: [Errno 28] No space left on device "
        "(reported as ValueError: you tried to log 0.0045 which is currently not supported.)")


def test_a_failure_while_handling_an_error_comes_after_it():
    def handler_fails():
        try:
            raise RuntimeError("the step failed")
        except RuntimeError:
            raise KeyError("and so did its handler")

    assert describe_error(raised(handler_fails)) == (
        "RuntimeError: the step failed (then, while handling it, KeyError: 'and so did its handler')")
