# Included by linux-cpu.cmake right after mlx-c's project(): force-include the std::format shim in C++.
add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:SHELL:-include ${CMAKE_CURRENT_LIST_DIR}/std_format_shim.h>")
