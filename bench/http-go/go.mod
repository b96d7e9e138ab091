module httpbench

go 1.19
