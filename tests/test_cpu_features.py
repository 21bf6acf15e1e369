"""Native bf16 detection, which picks the demo chain's precision (bf16 on AMX / AVX512-BF16, else fp32), and the
CPU's name, which the chain's summary records."""

from dynamic_llava.cpu_features import cpu_model_name, lists_native_bf16, native_bf16

XEON_AMX = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
            "flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
EPYC_AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse4_2 avx avx2 fma\n"


def test_native_bf16_is_read_from_the_flags_line() -> None:
    assert lists_native_bf16(XEON_AMX)
    assert not lists_native_bf16(EPYC_AVX2)
    assert not lists_native_bf16("model name : something without flags\n")
    assert isinstance(native_bf16(), bool)


def test_cpu_model_name_is_the_first_model_name_line() -> None:
    assert cpu_model_name(XEON_AMX) == "Intel(R) Xeon(R) Processor"
    assert cpu_model_name(XEON_AMX + "processor\t: 1\nmodel name\t: Other\n") == "Intel(R) Xeon(R) Processor"
    assert cpu_model_name(EPYC_AVX2) is None  # no model name line
