"""`openvino` packages: OpenVINO IR run by OpenVINO's CPU plugin, bf16 where the CPU has it."""
